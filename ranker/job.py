"""One training job as a file: a typed config (loadable from TOML) that names the
split, the item content and the variant, and ``run_train_job`` that trains it in this
process or, under ``torchrun``, as one rank of a ``DistributedModelParallel`` run.

Example ``job.toml``::

    split_dir = "runs/split"                # train/valid/test.parquet (mmtok split)
    out = "runs/train/ids"                  # metrics.json, model/ (servable), checkpoints/
    variant = "ids"
    item_codes = "runs/q/item_codes.parquet"   # mmtok quantize's output
    quantizer = "runs/q/quantizer"
    checkpoint_every = 500

    [ranker]
    embedding_dim = 16
    interaction = "dcn"
"""

from __future__ import annotations

import json
import statistics
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from mmdata.contracts import DataContractError, code_columns, read_codes, read_embeddings
from quantizer import Quantizer, load_quantizer
from ranker.bundle import ServableModel
from ranker.data import InMemoryBatches, ParquetBatches, Shard, endless_batches
from ranker.experiment import VARIANTS
from ranker.features import FeatureEncoder, ItemContent
from ranker.metrics import ranking_metrics
from ranker.model import RankerConfig, RankingModel
from ranker.train import (TrainResult, build_model, current_shard, predict, train_ranker,
                          train_step, unshard_model)

# A trained job's test scores, one row per test event (user_id, item_id, label, is_cold,
# prob), beside its metrics.json.
PREDICTIONS_FILE = "test_predictions.parquet"
# The job's servable model (``ranker.bundle``), under its out directory.
MODEL_DIR = "model"


@dataclass
class TrainJob:
    """One ranker to train: the split, the item content, the variant, the config.

    Every finished job writes ``out/model/``, the servable bundle (``ranker.bundle``):
    ``mmtok serve --model out/model`` serves it.
    """

    # Directory with train.parquet / valid.parquet / test.parquet (``mmtok split``).
    split_dir: str
    # Where metrics.json, test predictions, checkpoints/ and model/ go.
    out: str
    # One of ranker.VARIANTS: how the item's content enters the model.
    variant: str = "ids"
    # Item embeddings file (contract): the content vectors of "dense" and "ids_dense".
    item_embeddings: str | None = None
    # Item codes file (contract): the content IDs of "ids" and "ids_dense"; "recon"
    # decodes them into its content vectors.
    item_codes: str | None = None
    # The saved quantizer that wrote item_codes (``mmtok quantize``'s OUT/quantizer):
    # the served model tokenizes brand-new ads with it.
    quantizer: str | None = None
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
        needs = {"item_codes": variant.reads_codes, "quantizer": variant.reads_codes,
                 "item_embeddings": variant.dense == "embedding"}
        missing = [name for name, needed in needs.items() if needed and not getattr(self, name)]
        if missing:
            raise ValueError(f"variant {self.variant!r} needs {', '.join(missing)}")

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "TrainJob":
        """Reads a job file; ``overrides`` (None: keep the file's) replace its top-level
        keys. Unknown keys are an error naming them."""
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


def load_item_content(job: TrainJob, quantizer: Quantizer | None = None) -> ItemContent:
    """The item table the variant reads (codes and/or vectors), aligned by item id.
    ``quantizer``: the job's, if the caller has loaded it already."""
    variant = VARIANTS[job.variant]
    frames = []
    if variant.reads_codes:
        quantizer = quantizer or load_quantizer(job.quantizer)
        codes = read_codes(job.item_codes)
        if code_columns(codes) != list(quantizer.code_names):
            raise DataContractError(f"{job.item_codes}: code columns {code_columns(codes)}, but "
                                    f"the quantizer {job.quantizer} writes {quantizer.code_names}")
        frames.append(codes)
    if variant.dense == "embedding":
        emb = read_embeddings(job.item_embeddings)
        frames.append(pl.DataFrame({"item_id": emb.item_ids, "_row": np.arange(len(emb.item_ids))}))
    if not frames:  # no_content: the items are whatever the events name
        return ItemContent(_all_item_ids(job))
    table = frames[0]
    for other in frames[1:]:
        table = table.join(other, on="item_id", how="inner")
    item_ids = table["item_id"].to_numpy()
    codes_arr, code_names, sizes = None, [], []
    if quantizer is not None:
        code_names, sizes = list(quantizer.code_names), list(quantizer.codebook_sizes)
        codes_arr = np.ascontiguousarray(table.select(code_names).to_numpy().astype(np.int64))
    # What the IDs keep of the content: the recon variant's dense input, and the content-ID
    # rows' start under code_init "decoded".
    starts_decoded = variant.codes and job.ranker.code_init == "decoded"
    decoded = (quantizer.decode(codes_arr).astype(np.float32)
               if variant.dense == "recon" or starts_decoded else None)
    vectors = emb.vectors[table["_row"].to_numpy()] if variant.dense == "embedding" else (
        decoded if variant.dense == "recon" else None)
    return ItemContent(item_ids, vectors=vectors,
                       codes=codes_arr if variant.codes else None,
                       code_names=code_names if variant.codes else [],
                       codebook_sizes=sizes if variant.codes else [],
                       decoded=decoded if starts_decoded else None)


def _all_item_ids(job: TrainJob) -> np.ndarray:
    split = Path(job.split_dir)
    ids = pl.concat([pl.scan_parquet(split / f"{p}.parquet").select("item_id")
                     for p in ("train", "valid", "test")]).unique().collect()
    return ids["item_id"].to_numpy()


def job_inputs(job: TrainJob, shard: Shard | None = None
               ) -> tuple[Quantizer | None, FeatureEncoder, InMemoryBatches | ParquetBatches]:
    """``(quantizer, features, training batches)`` of a job: the quantizer its variant
    reads codes with (None if none), the feature encoder fitted on its training events,
    and this rank's batches of them (streamed from parquet, or in memory); ``shard``:
    this process' rank (default: a world of one)."""
    shard = shard or Shard()
    split = Path(job.split_dir)
    variant = VARIANTS[job.variant]
    quantizer = load_quantizer(job.quantizer) if variant.reads_codes else None
    content = load_item_content(job, quantizer)
    train_scan = pl.scan_parquet(split / "train.parquet")
    features = FeatureEncoder.from_config(train_scan if job.streaming else train_scan.collect(),
                                          content, job.ranker, use_codes=variant.codes,
                                          use_dense_content=variant.dense is not None)
    if job.streaming:
        source = ParquetBatches(split / "train.parquet", features, batch_size=job.ranker.batch_size,
                                seed=job.ranker.seed, shard=shard, buffer_groups=job.buffer_groups,
                                data_shards=job.data_shards)
    else:
        train = features.encode(train_scan.collect(), where="train events")
        source = InMemoryBatches(features, train, batch_size=job.ranker.batch_size,
                                 seed=job.ranker.seed, shard=shard)
    return quantizer, features, source


def interleaved_train_rates(jobs: dict[str, TrainJob], *, steps: int = 200, rounds: int = 9,
                            progress: bool = False) -> dict:
    """Training examples/s of each job, measured as a ranking engineer compares variants
    on a shared machine: windows of ``steps`` training steps (loader included, as in
    training), taken in turn across the jobs, ``rounds`` times after one warm-up round,
    so a burst of load hits every job alike. The order reverses every round (A B, B A,
    ...): the rates still climb for a few rounds after the warm-up, and a fixed order would
    hand that climb to whichever job runs second.

    Returns ``{"steps": .., "rounds": .., "rates": {name: [ex/s per round]},
    "median": {name: ex/s}, "ratio": {name: median over rounds of name's rate over the
    first job's in the same round}}``.
    """
    threads = torch.get_num_threads()
    streams = {}
    for name, job in jobs.items():
        _, features, source = job_inputs(job)
        model, sparse_opt, dense_opt = build_model(features, job.ranker)
        streams[name] = (endless_batches(source, item_id_dropout=job.ranker.item_id_dropout),
                         model, sparse_opt, dense_opt, job.ranker.num_threads)
    rates: dict[str, list[float]] = {name: [] for name in jobs}
    try:
        for round_ in tqdm(range(rounds + 1), desc="throughput", disable=not progress,
                           leave=False):
            order = list(streams) if round_ % 2 else list(streams)[::-1]
            for name in order:
                batches, model, sparse_opt, dense_opt, num_threads = streams[name]
                torch.set_num_threads(num_threads)
                start, seen = time.perf_counter(), 0
                for _ in range(steps):
                    batch = next(batches)
                    train_step(model, sparse_opt, dense_opt, batch)
                    seen += len(batch[2])
                if round_:  # the first round warms every job up
                    rates[name].append(seen / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    first = next(iter(jobs))
    return {"steps": steps, "rounds": rounds, "rates": rates,
            "median": {name: statistics.median(r) for name, r in rates.items()},
            "ratio": {name: statistics.median(a / b for a, b in zip(r, rates[first]))
                      for name, r in rates.items()}}


def run_train_job(job: TrainJob, *, resume: bool = False, progress: bool = True,
                  stop_after_steps: int | None = None) -> dict:
    """Trains the job's variant, tests the best step's model, and exports it.

    Returns (and on rank 0 writes to ``out/metrics.json``) the test metrics with
    ``valid_auc`` (the restored best step's), ``train_examples_per_s``, the history and
    the exported ``model_version``. Rank 0 writes ``out/model/``, the servable bundle
    (under several processes the ranks' table shards are gathered to it first), and
    ``out/test_predictions.parquet``."""
    shard = current_shard()
    out = Path(job.out)
    split = Path(job.split_dir)
    variant = VARIANTS[job.variant]
    quantizer, features, source = job_inputs(job, shard)
    valid = features.encode(pl.read_parquet(split / "valid.parquet"), where="validation events")
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
    metrics.update(valid_auc=trained.valid_auc,
                   train_examples_per_s=trained.train_examples_per_s,
                   best_epoch=trained.best_epoch, best_step=trained.best_step,
                   tables_restarted_from_epoch=trained.tables_restarted_from_epoch,
                   history=trained.history,
                   world_size=shard.world_size, resumed=trained.resumed,
                   wall_s=time.perf_counter() - started)
    # Collective under several processes: every rank sends its table shards to rank 0.
    plain = trained.model if isinstance(trained.model, RankingModel) \
        else unshard_model(trained.model, features, job.ranker)
    if shard.rank == 0:
        served = ServableModel(plain, features, job.ranker, quantizer=quantizer,
                               content_vectors=variant.dense)
        served.save(out / MODEL_DIR, name=job.variant)
        metrics["model_version"] = served.model_version
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
        (out / "job.toml").write_text(job.to_toml())
        # Per test row, for slicing the metrics by anything the events hold and for the
        # bench's paired intervals (ranker.comparison_intervals).
        test_events.select("user_id", "item_id", "label").with_columns(
            is_cold=test.is_cold.numpy(), prob=probs).write_parquet(out / PREDICTIONS_FILE)
    return metrics
