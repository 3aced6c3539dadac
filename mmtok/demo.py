"""``mmtok demo``: MovieLens-100K end to end - text -> MiniLM embedding -> content IDs ->
TorchRec rankers -> metrics, MLflow run, ``metrics.json`` and ``report.md``, and the
``ids`` variant as a servable model at ``<out>/model`` (``mmtok serve --model``)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from featurizer import embed_items, minilm_text_encoder
from mmdata import split_events, write_embeddings, write_movielens_100k
from mmdata.contracts import read_events, read_items
from mmtok.report import write_ranking_report
from mmtok.tracking import flat_params, start_tracking
from quantizer import ResidualKMeansConfig, ResidualKMeansQuantizer, encode_items, quantizer_metrics
from quantizer.mmdict import MmDictConfig, MmDictQuantizer
from ranker import (FeatureEncoder, ItemContent, RankerConfig, comparison_intervals,
                    quantization_loss, run_variants)
from ranker.bundle import ServableModel

DEMO_VARIANTS = ["no_content", "dense", "recon", "ids", "ids_dense"]
# The variant exported for serving: content IDs only, so a brand-new ad needs nothing
# but its embedding.
SERVED_VARIANT = "ids"


def build_quantizer(kind: str, *, seed: int, steps: int | None = None,
                    scale_sizes: list[int] | None = None, levels: int | None = None):
    """The demo's quantizer: "mmdict" (the learned one, default) or "rq-kmeans" (three
    parallel k-means scales, the simple baseline)."""
    layout = {k: v for k, v in {"scale_sizes": scale_sizes, "levels": levels}.items() if v}
    if kind == "mmdict":
        config = MmDictConfig(seed=seed, **layout, **({"steps": steps} if steps else {}))
        return MmDictQuantizer(config), config
    if kind == "rq-kmeans":
        config = ResidualKMeansConfig(seed=seed, **layout)
        return ResidualKMeansQuantizer(config), config
    raise ValueError(f"unknown quantizer {kind!r}: choose 'mmdict' or 'rq-kmeans'")


def run_demo(out_dir: str | Path, *, seed: int = 0, epochs: int | None = None,
             variants: list[str] | None = None, quantizer: str = "mmdict",
             quantizer_steps: int | None = None, progress: bool = True) -> dict:
    """Runs the whole pipeline on MovieLens-100K; returns what ``metrics.json`` holds."""
    out = Path(out_dir)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    variants = variants or DEMO_VARIANTS
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[mmtok demo {time.perf_counter() - started:6.1f}s] {msg}", flush=True)

    t = time.perf_counter()
    items_path, events_path = write_movielens_100k(data)
    items, events = read_items(items_path), read_events(events_path).drop("rating")
    timings["data_s"] = time.perf_counter() - t
    log(f"MovieLens-100K: {items.height} items, {events.height} events -> {data}")

    t = time.perf_counter()
    encoder = minilm_text_encoder()
    embeddings = embed_items(items, [encoder], batch_size=128, progress=progress)
    write_embeddings(embeddings, data / "item_embeddings.parquet")
    timings["featurize_s"] = time.perf_counter() - t
    log(f"embedded item text with {encoder.name}: {embeddings.vectors.shape}")

    t = time.perf_counter()
    quantizer, qconfig = build_quantizer(quantizer, seed=seed, steps=quantizer_steps)
    quantizer.fit(embeddings.vectors, progress=progress)
    codes_frame = encode_items(quantizer, embeddings)
    codes_frame.write_parquet(data / "item_codes.parquet")
    quantizer.save(out / "quantizer")
    codes = codes_frame.select(quantizer.code_names).to_numpy()
    recon = quantizer.decode(codes)
    qmetrics = quantizer_metrics(embeddings.vectors, codes, recon, quantizer.codebook_sizes, seed=seed)
    timings["quantize_s"] = time.perf_counter() - t
    log(f"quantized into {len(quantizer.code_names)} IDs ({qmetrics['bits']:.0f} bits): "
        f"rel_mse {qmetrics['rel_mse']:.3f}, recall@10 {qmetrics['recall_at_10']:.3f}")

    split = split_events(events, seed=seed)
    rconfig = RankerConfig(seed=seed, **({"epochs": epochs} if epochs else {}))
    mlflow = start_tracking(out, "mmtok-demo")
    t = time.perf_counter()
    with mlflow.start_run(run_name="demo-movielens-100k") as parent:
        mlflow.log_params({"dataset": "movielens-100k", "encoder": encoder.name,
                           "quantizer": quantizer.kind, "seed": seed,
                           **flat_params("quantizer", asdict(qconfig)),
                           **flat_params("ranker", asdict(rconfig))})
        mlflow.log_metrics({f"quantizer.{k}": v for k, v in qmetrics.items()})

        def log_variant(name: str, metrics: dict, trained) -> None:
            with mlflow.start_run(run_name=name, nested=True):
                mlflow.log_params({"variant": name, **flat_params("ranker", asdict(rconfig))})
                for row in metrics["history"]:
                    mlflow.log_metrics({"train_loss": row["train_loss"],
                                        "valid_auc": row["valid_auc"]}, step=row["epoch"])
                mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items()
                                    if isinstance(v, (int, float)) and np.isfinite(v)})
            log(f"{name:>10}: test AUC {metrics['auc']:.4f} (warm {metrics['auc_warm']:.4f}, "
                f"cold {metrics['auc_cold']:.4f}), NE {metrics['ne']:.4f}")
            if name == SERVED_VARIANT:
                # The same encoder run_variants fitted (a pure function of the train split).
                content = ItemContent(embeddings.item_ids, codes=codes,
                                      code_names=quantizer.code_names,
                                      codebook_sizes=quantizer.codebook_sizes)
                features = FeatureEncoder.from_config(split.train, content, rconfig,
                                                      use_codes=True, use_dense_content=False)
                served = ServableModel(trained.model, features, rconfig, quantizer=quantizer)
                served.save(out / "model", name=f"demo-{name}")
                log(f"servable model {served.model_version} -> {out / 'model'}")

        predictions: dict[str, np.ndarray] = {}
        results = run_variants(
            split, embeddings.item_ids, embeddings=embeddings.vectors, codes=codes,
            code_names=quantizer.code_names, codebook_sizes=quantizer.codebook_sizes,
            reconstructions=recon, names=variants, config=rconfig, progress=progress,
            on_result=log_variant, predictions=predictions)
        timings["rank_s"] = time.perf_counter() - t
        loss = quantization_loss(results)
        intervals = comparison_intervals(split.test["label"].to_numpy(),
                                         split.test["is_cold"].to_numpy(), predictions, seed=seed)
        timings["total_s"] = time.perf_counter() - started
        metrics = {
            "dataset": {"name": "movielens-100k", "items": items.height, "events": events.height,
                        "split": split.summary(), "embedding_dim": embeddings.dim,
                        "encoder": encoder.name},
            "quantizer": {"kind": quantizer.kind, "code_names": quantizer.code_names,
                          "codebook_sizes": quantizer.codebook_sizes, **qmetrics},
            "variants": {name: {k: v for k, v in m.items()} for name, m in results.items()},
            "quantization_loss": loss,
            "intervals": intervals,
            "ranker": asdict(rconfig),
            "timings": timings,
            "mlflow_run_id": parent.info.run_id,
        }
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
        report = write_ranking_report(out, metrics, title="mmtok demo - MovieLens-100K")
        mlflow.log_metrics({k: v for k, v in loss.items()})
        if (out / "model").is_dir():  # mmtok serve --model runs:/<mlflow_run_id>/model
            mlflow.log_artifacts(str(out / "model"), artifact_path="model")
        mlflow.log_artifact(str(out / "metrics.json"))
        mlflow.log_artifact(str(report))
        for png in out.glob("*.png"):
            mlflow.log_artifact(str(png))
    log(f"done in {timings['total_s']:.0f}s: {out / 'report.md'}, {out / 'metrics.json'}")
    return metrics
