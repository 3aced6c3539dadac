"""One training job as a file: a typed config (loadable from TOML) that names the
split, the item content and the variant, and ``run_train_job`` that trains it in this
process or, under ``torchrun``, as one rank of a ``DistributedModelParallel`` run.

Example ``job.toml``::

    split_dir = "runs/bench/split"          # train/valid/test.parquet (mmdata.write_split)
    out = "runs/bench/variants/ids"
    variant = "ids"
    item_codes = "runs/bench/codes/mmtok.parquet"
    checkpoint_every = 500

    [ranker]
    embedding_dim = 16
    interaction = "dcn"
"""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import polars as pl

from mmdata.contracts import DataContractError, code_columns, read_codes, read_embeddings
from safetensors.torch import save_file
from torch import nn

from ranker.data import InMemoryBatches, ParquetBatches
from ranker.experiment import VARIANTS
from ranker.features import FeatureEncoder, ItemContent
from ranker.metrics import ranking_metrics
from ranker.model import RankerConfig, RankingModel
from ranker.train import TrainResult, current_shard, predict, train_ranker, unshard_model

# A trained job's test scores, one row per test event (user_id, item_id, label, is_cold,
# prob), beside its metrics.json.
PREDICTIONS_FILE = "test_predictions.parquet"


@dataclass
class TrainJob:
    # Directory with train.parquet / valid.parquet / test.parquet from mmdata.write_split.
    split_dir: str
    # Where metrics.json, checkpoints/ and model/ go.
    out: str
    # One of ranker.VARIANTS: how the item's content enters the model.
    variant: str = "ids"
    # Item embeddings file (contract): needed by "dense" and "ids_dense".
    item_embeddings: str | None = None
    # Item codes file (contract): needed by "ids" and "ids_dense".
    item_codes: str | None = None
    # Item embeddings file holding decode(encode(x)): needed by "recon".
    item_reconstructions: str | None = None
    # Rows per code table; default: largest code + 1 in the codes file.
    codebook_sizes: list[int] | None = None
    # Stream training events from parquet (bounded memory) instead of loading them.
    streaming: bool = True
    # Streams the training file is read as (global batch k = the k-th rows of each);
    # torchrun's process count must divide it. Fixed by the job, so 1, 2 or 4 processes
    # train on the same batches.
    data_shards: int = 4
    # Row groups (or slices of them) per stream's shuffle buffer when streaming.
    buffer_groups: int = 1
    # Checkpoint every this many steps (0: at epoch ends only).
    checkpoint_every: int = 0
    ranker: RankerConfig = field(default_factory=RankerConfig)

    def __post_init__(self) -> None:
        if isinstance(self.ranker, dict):
            self.ranker = RankerConfig(**self.ranker)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r}: choose from {list(VARIANTS)}")
        variant = VARIANTS[self.variant]
        needs = {"item_codes": variant.codes,
                 "item_embeddings": variant.dense == "embedding",
                 "item_reconstructions": variant.dense == "recon"}
        missing = [name for name, needed in needs.items() if needed and not getattr(self, name)]
        if missing:
            raise ValueError(f"variant {self.variant!r} needs {', '.join(missing)}")

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "TrainJob":
        """Reads a job file; unknown keys are an error naming them."""
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        raw.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
        raw["ranker"] = _ranker_config(raw.get("ranker", {}), path)
        return cls(**raw)

    def to_toml(self) -> str:
        def value(v) -> str:
            return json.dumps(v)  # TOML basic strings, numbers, bools and arrays read alike

        lines = [f"{k} = {value(v)}" for k, v in asdict(self).items()
                 if k != "ranker" and v is not None]
        lines.append("\n[ranker]")
        lines += [f"{k} = {value(v)}" for k, v in asdict(self.ranker).items()]
        return "\n".join(lines) + "\n"


def _ranker_config(table: dict, path) -> RankerConfig:
    known = {f.name for f in fields(RankerConfig)}
    bad = sorted(set(table) - known)
    if bad:
        raise ValueError(f"{path}: unknown [ranker] keys {bad}; known: {sorted(known)}")
    return RankerConfig(**table)


def load_ranker_config(path: str | Path) -> RankerConfig:
    """The ``[ranker]`` table of a TOML file alone (defaults for what it leaves out)."""
    with open(path, "rb") as f:
        return _ranker_config(tomllib.load(f).get("ranker", {}), path)


def load_item_content(job: TrainJob) -> ItemContent:
    """The item table the variant reads (codes and/or vectors), aligned by item id."""
    variant = VARIANTS[job.variant]
    frames = []
    if variant.codes:
        codes = read_codes(job.item_codes)
        frames.append(codes)
    vectors_path = {"embedding": job.item_embeddings, "recon": job.item_reconstructions,
                    None: None}[variant.dense]
    if vectors_path:
        emb = read_embeddings(vectors_path)
        frames.append(pl.DataFrame({"item_id": emb.item_ids, "_row": np.arange(len(emb.item_ids))}))
    if not frames:  # no_content: the items are whatever the events name
        return ItemContent(_all_item_ids(job))
    table = frames[0]
    for other in frames[1:]:
        table = table.join(other, on="item_id", how="inner")
    item_ids = table["item_id"].to_numpy()
    codes_arr, code_names, sizes = None, [], []
    if variant.codes:
        code_names = code_columns(table)
        codes_arr = np.ascontiguousarray(table.select(code_names).to_numpy().astype(np.int64))
        sizes = job.codebook_sizes or [int(codes_arr[:, j].max()) + 1 for j in range(len(code_names))]
        if len(sizes) != len(code_names):
            raise DataContractError(f"{job.item_codes}: {len(code_names)} code columns but "
                                    f"{len(sizes)} codebook_sizes")
    vectors = emb.vectors[table["_row"].to_numpy()] if vectors_path else None
    return ItemContent(item_ids, vectors=vectors, codes=codes_arr, code_names=code_names,
                       codebook_sizes=sizes)


def _all_item_ids(job: TrainJob) -> np.ndarray:
    split = Path(job.split_dir)
    ids = pl.concat([pl.scan_parquet(split / f"{p}.parquet").select("item_id")
                     for p in ("train", "valid", "test")]).unique().collect()
    return ids["item_id"].to_numpy()


def save_model(model: nn.Module, directory: Path, job: TrainJob,
               features: FeatureEncoder) -> Path | None:
    """The trained model as one file, ``model.safetensors`` (a plain ``RankingModel``
    state dict; under several processes the ranks' table shards are gathered to rank 0,
    which writes it), with the job beside it. Returns the directory on rank 0."""
    plain = model if isinstance(model, RankingModel) else unshard_model(model, features, job.ranker)
    if plain is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()},
              str(directory / "model.safetensors"),
              metadata={"world_size": str(current_shard().world_size),
                        "sparse_names": json.dumps(features.sparse_names)})
    (directory / "job.toml").write_text(job.to_toml())
    return directory


def run_train_job(job: TrainJob, *, resume: bool = False, progress: bool = True,
                  stop_after_steps: int | None = None) -> dict:
    """Trains the job's variant and tests it; returns (and on rank 0 writes to
    ``out/metrics.json``) the test metrics with ``train_examples_per_s`` and history."""
    shard = current_shard()
    out = Path(job.out)
    split = Path(job.split_dir)
    content = load_item_content(job)
    variant = VARIANTS[job.variant]
    train_scan = pl.scan_parquet(split / "train.parquet")
    features = FeatureEncoder.from_config(train_scan if job.streaming else train_scan.collect(),
                                          content, job.ranker, use_codes=variant.codes,
                                          use_dense_content=variant.dense is not None)
    valid = features.encode(pl.read_parquet(split / "valid.parquet"), where="validation events")
    if job.streaming:
        source = ParquetBatches(split / "train.parquet", features, batch_size=job.ranker.batch_size,
                                seed=job.ranker.seed, shard=shard, buffer_groups=job.buffer_groups,
                                data_shards=job.data_shards)
    else:
        train = features.encode(train_scan.collect(), where="train events")
        source = InMemoryBatches(features, train, batch_size=job.ranker.batch_size,
                                 seed=job.ranker.seed, shard=shard)
    started = time.perf_counter()
    trained: TrainResult = train_ranker(
        features, source, valid, job.ranker, progress=progress, desc=job.variant,
        checkpoint_dir=out / "checkpoints", checkpoint_every=job.checkpoint_every,
        resume=resume, stop_after_steps=stop_after_steps)
    if stop_after_steps is not None and not trained.history:
        return {"stopped_after_steps": stop_after_steps, "world_size": shard.world_size,
                "train_examples_per_s": trained.train_examples_per_s}
    test_events = pl.read_parquet(split / "test.parquet")
    test = features.encode(test_events, where="test events")
    probs = predict(trained.model, features, test)
    metrics = ranking_metrics(test.labels.numpy(), probs, test.is_cold.numpy())
    metrics.update(train_examples_per_s=trained.train_examples_per_s,
                   best_epoch=trained.best_epoch, history=trained.history,
                   world_size=shard.world_size, resumed=trained.resumed,
                   wall_s=time.perf_counter() - started)
    save_model(trained.model, out / "model", job, features)
    if shard.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
        (out / "job.toml").write_text(job.to_toml())
        # Per test row, for slicing the metrics by anything the events hold and for the
        # bench's paired intervals (ranker.comparison_intervals).
        test_events.select("user_id", "item_id", "label").with_columns(
            is_cold=test.is_cold.numpy(), prob=probs).write_parquet(out / PREDICTIONS_FILE)
    return metrics
