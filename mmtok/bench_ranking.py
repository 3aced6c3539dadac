"""``mmtok bench-ranking``: the offline quantization-loss report on any events and
item-embeddings files of the contracts.

Applies the evaluation protocol (``mmdata.write_split``, streamed), fits mmtok's
quantizer and the baselines on every item's embedding at equal bits, trains every
variant with the same architecture and budget (each a ``ranker.TrainJob``, in this
process or under ``torchrun`` with ``--nproc``), and writes ``metrics.json``,
``report.md`` and plots; MLflow gets a parent run with one nested run per variant.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from mmdata import ItemEmbeddings, read_embeddings, write_embeddings, write_split
from mmtok.bench_quantizer import build_quantizers
from mmtok.report import write_ranking_report
from mmtok.tracking import flat_params, start_tracking
from mmtok.train_cmd import log_train_run
from quantizer import encode_items, quantizer_metrics
from ranker import RankerConfig, comparison_intervals, quantization_loss
from ranker.job import PREDICTIONS_FILE, TrainJob, run_train_job

# variant name -> (TrainJob variant, codes of which quantizer)
CORE_VARIANTS = {"no_content": ("no_content", None), "dense": ("dense", None),
                 "recon": ("recon", "mmtok"), "ids": ("ids", "mmtok"),
                 "ids_dense": ("ids_dense", "mmtok")}
BASELINES = ["faiss_rq", "faiss_pq", "kmeans", "lsh"]


def bench_variants(baselines: list[str]) -> dict[str, tuple[str, str | None]]:
    return {**CORE_VARIANTS, **{f"{b}_ids": ("ids", b) for b in baselines}}


def run_bench_ranking(events_path: str | Path, embeddings_path: str | Path, out_dir: str | Path,
                      *, config: RankerConfig | None = None, variants: list[str] | None = None,
                      baselines: list[str] | None = None, scale_sizes: list[int] | None = None,
                      levels: int = 2, quantizer_steps: int | None = None, nproc: int = 1, seed: int = 0,
                      ranker_seeds: list[int] | None = None, streaming: bool = True,
                      progress: bool = True) -> dict:
    """Returns (and writes as ``metrics.json``) the report.

    ``ranker_seeds``: train every variant once per seed and report the mean of each
    metric (the per-seed test AUCs under ``auc_seeds``, their standard deviation under
    ``auc_std``); the split and the quantizers keep ``seed``. One run of a small dataset
    moves AUC by a few thousandths, more than some gaps the report is read for.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config or RankerConfig(seed=seed)
    scale_sizes = scale_sizes or [16, 64, 256]
    baselines = BASELINES if baselines is None else baselines
    table = bench_variants(baselines)
    variants = variants or list(table)
    unknown = [v for v in variants if v not in table]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(table)}")
    # Built (not fitted) before any work, so a bad layout is refused at once.
    quantizers = build_quantizers(scale_sizes, levels, seed=seed, steps=quantizer_steps)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def log(msg: str) -> None:
        print(f"[mmtok bench-ranking {time.perf_counter() - started:6.1f}s] {msg}", flush=True)

    t = time.perf_counter()
    split = write_split(events_path, out / "split", seed=seed)
    timings["split_s"] = time.perf_counter() - t
    log(f"split: train {split.summary['train']['rows']:,} / valid {split.summary['valid']['rows']:,}"
        f" / test {split.summary['test']['rows']:,} rows "
        f"(cold test rows {split.summary['test']['cold_rows']:,})")

    emb = read_embeddings(embeddings_path)
    embeddings_file = Path(embeddings_path)
    needed = {q for v in variants if (q := table[v][1])}
    t = time.perf_counter()
    qmetrics, codes_files = {}, {}
    for name in [q for q in quantizers if q in needed]:
        q = quantizers[name]
        kwargs = {"progress": progress} if name == "mmtok" else {}
        q.fit(emb.vectors, **kwargs)
        frame = encode_items(q, emb)
        codes_files[name] = out / "codes" / f"{name}.parquet"
        codes_files[name].parent.mkdir(exist_ok=True)
        frame.write_parquet(codes_files[name])
        codes = frame.select(q.code_names).to_numpy()
        recon = q.decode(codes)
        qmetrics[name] = {"code_names": q.code_names, "codebook_sizes": list(q.codebook_sizes),
                          **quantizer_metrics(emb.vectors, codes, recon, q.codebook_sizes, seed=seed)}
        if name == "mmtok":
            write_embeddings(ItemEmbeddings(emb.item_ids, recon.astype(np.float32)),
                             out / "codes" / "mmtok_recon.parquet")
            q.save(out / "quantizer")
        log(f"{name}: {len(q.code_names)} IDs, rel_mse {qmetrics[name]['rel_mse']:.3f}, "
            f"recall@10 {qmetrics[name]['recall_at_10']:.3f}")
    timings["quantize_s"] = time.perf_counter() - t

    mlflow = start_tracking(out, "mmtok-bench-ranking")
    results: dict[str, dict] = {}
    test_rows, scores = None, {}  # the test rows' labels and coldness; variant -> (S, N)
    t = time.perf_counter()
    with mlflow.start_run(run_name=f"bench-ranking-{embeddings_file.stem}") as parent:
        mlflow.log_params({"events": str(events_path), "item_embeddings": str(embeddings_path),
                           "nproc": nproc, "seed": seed, "streaming": streaming,
                           "scale_sizes": ",".join(map(str, scale_sizes)),
                           "levels": levels,
                           "ranker_seeds": ",".join(map(str, ranker_seeds or [config.seed])),
                           **flat_params("ranker", asdict(config))})
        for name in tqdm(variants, desc="variants", disable=not progress, leave=False):
            job_variant, qname = table[name]
            job = TrainJob(
                split_dir=str(out / "split"), out=str(out / "variants" / name), variant=job_variant,
                item_embeddings=str(embeddings_file),
                item_codes=str(codes_files[qname]) if qname else None,
                item_reconstructions=str(out / "codes" / "mmtok_recon.parquet")
                if job_variant == "recon" else None,
                codebook_sizes=qmetrics[qname]["codebook_sizes"] if qname else None,
                streaming=streaming, ranker=config)
            runs, probs = [], []
            for ranker_seed in ranker_seeds or [config.seed]:
                seeded = replace(job, ranker=replace(config, seed=ranker_seed),
                                 out=job.out if not ranker_seeds else f"{job.out}/seed-{ranker_seed}")
                runs.append(_run_job(seeded, nproc=nproc, progress=progress))
                predicted = pl.read_parquet(Path(seeded.out) / PREDICTIONS_FILE)
                test_rows = predicted.select("label", "is_cold") if test_rows is None else test_rows
                probs.append(predicted["prob"].to_numpy())
                # One nested MLflow run per trained model, with its own model files.
                log_train_run(seeded, runs[-1], nested=True,
                              run_name=name if not ranker_seeds else f"{name}-seed{ranker_seed}")
            scores[name] = np.stack(probs)  # (S, N)
            metrics = _mean_over_seeds(runs) if ranker_seeds else runs[0]
            results[name] = metrics
            log(f"{name:>14}: test AUC {metrics['auc']:.4f} (warm {metrics['auc_warm']:.4f}, "
                f"cold {metrics['auc_cold']:.4f}), {metrics['train_examples_per_s']:,.0f} ex/s")
        timings["rank_s"] = time.perf_counter() - t
        loss = quantization_loss(results)
        t = time.perf_counter()
        intervals = comparison_intervals(test_rows["label"].to_numpy(),
                                         test_rows["is_cold"].to_numpy(), scores, seed=seed) \
            if test_rows is not None else {}
        timings["intervals_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - started
        report = {
            "dataset": {"name": Path(events_path).parent.name or str(events_path),
                        "events_path": str(events_path), "item_embeddings_path": str(embeddings_path),
                        "items": len(emb), "embedding_dim": emb.dim,
                        "events": sum(split.summary[p]["rows"] for p in ("train", "valid", "test")),
                        "split": split.summary, "encoder": "from the embeddings file"},
            "quantizer": {"kind": "mmtok", **qmetrics["mmtok"]} if "mmtok" in qmetrics else None,
            "quantizers": qmetrics,
            "variants": results,
            "quantization_loss": loss,
            "intervals": intervals,
            "nproc": nproc,
            "ranker": asdict(config),
            "ranker_seeds": ranker_seeds or [config.seed],
            "timings": timings,
            "mlflow_run_id": parent.info.run_id,
        }
        (out / "metrics.json").write_text(json.dumps(report, indent=2, default=float))
        md = write_ranking_report(out, report, title=f"mmtok bench-ranking - {report['dataset']['name']}")
        mlflow.log_metrics(dict(loss))
        for path in [out / "metrics.json", md, *out.glob("*.png")]:
            mlflow.log_artifact(str(path))
    log(f"done in {timings['total_s']:.0f}s: {md}")
    return report


def _mean_over_seeds(runs: list[dict]) -> dict:
    """Numeric metrics averaged over seeded runs; the first run's history."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(np.mean([r[key] for r in runs]))
    out["auc_seeds"] = [r["auc"] for r in runs]
    out["auc_cold_seeds"] = [r["auc_cold"] for r in runs]
    out["auc_std"] = float(np.std(out["auc_seeds"]))
    return out


def _run_job(job: TrainJob, *, nproc: int, progress: bool) -> dict:
    """Trains one variant: here, or under torchrun with ``nproc`` processes. A finished
    run's checkpoints are deleted (they serve ``--resume`` only; the model stays): with
    the baselines' n-gram tables they come to about 600 MB per MovieLens run."""
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = _train_variant(job, nproc=nproc, progress=progress)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return metrics


def _train_variant(job: TrainJob, *, nproc: int, progress: bool) -> dict:
    out = Path(job.out)
    if nproc == 1:
        return run_train_job(job, progress=progress)
    config = out / "job.toml"
    config.write_text(job.to_toml())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "mmtok.cli", "train",
           "--config", str(config), "--no-track", *([] if progress else ["--quiet"])]
    env = {**os.environ, "OMP_NUM_THREADS": str(job.ranker.num_threads)}
    proc = subprocess.run(cmd, env=env, capture_output=not progress, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed for {job.variant} ({proc.returncode}): "
                           f"{(proc.stderr or '')[-2000:]}")
    return json.loads((out / "metrics.json").read_text())
