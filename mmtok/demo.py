"""``mmtok demo``: MovieLens-100K end to end - text -> MiniLM embedding -> content IDs ->
TorchRec rankers -> metrics, MLflow runs, ``metrics.json`` and ``report.md``.

The demo is ``mmtok bench-ranking`` on the packaged data, with the core variants only
(task-aware ``task_ids`` included):
every variant is one ``TrainJob`` and leaves its servable model; the ``ids`` variant's
is copied to ``<out>/model`` (``mmtok serve --model``), and ``<out>/job.toml`` is that
variant as a job to retrain (``mmtok train --config <out>/job.toml --out DIR``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from featurizer import embed_items, minilm_text_encoder
from mmdata import write_embeddings, write_movielens_100k
from mmdata.contracts import read_items
from mmtok.bench_ranking import STARTER_VARIANT, ReportLabels, run_bench_ranking
from ranker import RankerConfig
from ranker.job import MODEL_DIR

DEMO_VARIANTS = ["no_content", "dense", "recon", "ids", "ids_dense", "task_ids"]


def run_demo(out_dir: str | Path, *, seed: int = 0, seeds: int = 3, epochs: int | None = None,
             variants: list[str] | None = None, quantizer: str = "mmdict",
             quantizer_steps: int | None = None, task_signal: str | None = None,
             progress: bool = True) -> dict:
    """Runs the whole pipeline on MovieLens-100K, every variant trained with ``seeds``
    ranker seeds (from ``seed``); returns what ``metrics.json`` holds."""
    out = Path(out_dir)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[mmtok demo {time.perf_counter() - started:6.1f}s] {msg}", flush=True)

    t = time.perf_counter()
    items_path, events_path = write_movielens_100k(data)
    items = read_items(items_path)
    timings["data_s"] = time.perf_counter() - t
    log(f"MovieLens-100K: {items.height} items -> {data}")

    t = time.perf_counter()
    encoder = minilm_text_encoder()
    embeddings = embed_items(items, [encoder], batch_size=128, progress=progress)
    write_embeddings(embeddings, data / "item_embeddings.parquet")
    timings["featurize_s"] = time.perf_counter() - t
    log(f"embedded item text with {encoder.name}: {embeddings.vectors.shape}")

    config = RankerConfig(seed=seed, **({"epochs": epochs} if epochs else {}))
    metrics = run_bench_ranking(
        events_path, data / "item_embeddings.parquet", out, config=config,
        variants=variants or [v for v in DEMO_VARIANTS
                              if quantizer == "mmdict" or v != "task_ids"],
        baselines=[], quantizer=quantizer, quantizer_steps=quantizer_steps,
        task_signal=task_signal, seed=seed, progress=progress, timings=timings,
        ranker_seeds=list(range(seed, seed + seeds)),
        labels=ReportLabels(experiment="mmtok-demo", run_name="demo-movielens-100k",
                            title="mmtok demo - MovieLens-100K", dataset="movielens-100k",
                            encoder=encoder.name))
    if STARTER_VARIANT in metrics["models"]:
        served = out / metrics["models"][STARTER_VARIANT]
        shutil.rmtree(out / MODEL_DIR, ignore_errors=True)
        shutil.copytree(served, out / MODEL_DIR)
        log(f"servable model ({STARTER_VARIANT}) -> {out / MODEL_DIR}; retrain it with "
            f"`mmtok train --config {out / 'job.toml'} --out DIR`")
    return metrics
