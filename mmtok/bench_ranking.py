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
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from mmdata import ORACLE_COLUMN, read_embeddings, write_split
from mmtok.report import write_ranking_report
from mmtok.tracking import flat_params, start_tracking
from mmtok.train_cmd import default_train_workers, launch_train_jobs, log_train_run, worker_pool
from quantizer import (Engagement, build_quantizer, build_quantizers, encode_items,
                       load_quantizer, quantizer_metrics, save_quantizer)
from ranker import RankerConfig, comparison_intervals, quantization_loss, ranking_metrics
from quantizer.task_aware import DEFAULT_TASK_SIGNAL
from ranker.job import MODEL_DIR, PREDICTIONS_FILE, TrainJob, interleaved_train_rates

# The variants whose training rates the bench compares in interleaved windows (the first
# is the reference).
THROUGHPUT_VARIANTS = ("no_content", "ids")

# variant name -> (TrainJob variant, codes of which quantizer)
CORE_VARIANTS = {"no_content": ("no_content", None), "dense": ("dense", None),
                 "recon": ("recon", "mmtok"), "ids": ("ids", "mmtok"),
                 "ids_dense": ("ids_dense", "mmtok"),
                 # task-aware tokens: mmtok's quantizer aligned with the training events
                 "task_ids": ("ids", "task_mmtok")}

BASELINES = ["faiss_rq", "faiss_pq", "kmeans", "lsh"]
# The job a user retrains first: the content IDs variant (written as OUT/job.toml).
STARTER_VARIANT = "ids"
# Ranker seeds per variant: one seed of a CTR model moves AUC by more than many gaps the
# report is read for; three let the intervals see the seed spread.
DEFAULT_SEEDS = (0, 1, 2)


def bench_variants(baselines: list[str], quantizer: str = "mmdict"
                   ) -> dict[str, tuple[str, str | None]]:
    """Variant -> (TrainJob variant, quantizer); task-aware IDs only where mmtok's
    quantizer is MmDict (the one that aligns with behaviour)."""
    core = {k: v for k, v in CORE_VARIANTS.items()
            if quantizer == "mmdict" or v[1] != "task_mmtok"}
    return {**core, **{f"{b}_ids": ("ids", b) for b in baselines}}


@dataclass
class ReportLabels:
    """How a report names its run (the demo and the bench share one pipeline)."""

    # MLflow experiment of the parent run.
    experiment: str = "mmtok-bench-ranking"
    # Name of the parent run; None: ``bench-ranking-<embeddings file stem>``.
    run_name: str | None = None
    # Report title; None: ``mmtok bench-ranking - <dataset name>``.
    title: str | None = None
    # Dataset name; None: the events file's folder.
    dataset: str | None = None
    # The encoder that made the embeddings, as the report names it.
    encoder: str = "from the embeddings file"


def run_bench_ranking(events_path: str | Path, embeddings_path: str | Path, out_dir: str | Path,
                      *, config: RankerConfig | None = None, variants: list[str] | None = None,
                      baselines: list[str] | None = None, scale_sizes: list[int] | None = None,
                      levels: int = 2, quantizer: str = "mmdict", quantizer_steps: int | None = None,
                      task_signal: str | None = None, scale_mode: str | None = None,
                      nproc: int = 1, workers: int | None = None, seed: int = 0,
                      ranker_seeds=DEFAULT_SEEDS,
                      streaming: bool = True, progress: bool = True,
                      labels: ReportLabels | None = None,
                      timings: dict[str, float] | None = None) -> dict:
    """Returns (and writes as ``metrics.json``) the report.

    ``quantizer``: the kind (``quantizer.build_quantizer``) whose IDs the core variants
    read ("mmdict", or "rq-kmeans"). ``task_signal``: what the task-aware tokens of
    ``task_ids`` align with, from the training events only ("clicks" or
    "co_engagement", see ``quantizer.task_aware``; None: its default). ``scale_mode``:
    mmdict's scales "parallel" (default) or as one "cascade". ``ranker_seeds``: train every variant once per seed
    and report the mean of each metric (the per-seed test AUCs under ``auc_seeds``, their
    standard deviation under ``auc_std``); the split and the quantizers keep ``seed``. One
    run of a small dataset moves AUC by a few thousandths, more than some gaps the report
    is read for, and the intervals draw the seeds too. ``timings``: earlier stages'
    seconds, reported with the bench's.

    The quantizers fit, and then every variant and seed (one ``TrainJob`` each, run by
    ``mmtok.train_cmd.launch_train_jobs``) trains, ``workers`` at a time (None: as many
    as the cores hold, see ``default_train_workers``),
    each here or under torchrun (``nproc``); each leaves its servable model under
    ``variants/<name>/seed-<seed>/model``, and when ``ids`` runs, ``OUT/job.toml`` is its
    first seed's job, to retrain.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()  # the jobs' paths: valid from any working directory
    labels = labels or ReportLabels()
    config = config or RankerConfig(seed=seed)
    scale_sizes = scale_sizes or [16, 64, 256]
    task_signal = task_signal or DEFAULT_TASK_SIGNAL
    baselines = BASELINES if baselines is None else baselines
    table = bench_variants(baselines, quantizer)
    variants = variants or list(table)
    unknown = [v for v in variants if v not in table]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(table)}")
    # Built (not fitted) before any work, so a bad layout is refused at once.
    quantizers = build_quantizers(scale_sizes, levels, seed=seed, steps=quantizer_steps,
                                  kind=quantizer, scale_mode=scale_mode)
    if "task_ids" in variants:
        quantizers["task_mmtok"] = build_quantizer(
            quantizer, seed=seed, steps=quantizer_steps, scale_sizes=scale_sizes,
            levels=levels, task_signal=task_signal, scale_mode=scale_mode)
    started = time.perf_counter()
    timings = dict(timings or {})
    earlier_s = sum(timings.values())

    def log(msg: str) -> None:
        print(f"[mmtok bench-ranking {time.perf_counter() - started:6.1f}s] {msg}", flush=True)

    t = time.perf_counter()
    split = write_split(events_path, out / "split", seed=seed)
    timings["split_s"] = time.perf_counter() - t
    log(f"split: train {split.summary['train']['rows']:,} / valid {split.summary['valid']['rows']:,}"
        f" / test {split.summary['test']['rows']:,} rows "
        f"(cold test rows {split.summary['test']['cold_rows']:,})")

    emb = read_embeddings(embeddings_path)
    embeddings_file = Path(embeddings_path).resolve()
    needed = {q for v in variants if (q := table[v][1])}
    workers = workers or default_train_workers(config.num_threads, nproc)
    t = time.perf_counter()
    qmetrics, codes_files, quantizer_dirs = fit_quantizers(
        {name: q for name, q in quantizers.items() if name in needed}, emb, split.train,
        root, seed=seed, progress=progress, log=log, workers=workers)
    timings["quantize_s"] = time.perf_counter() - t

    mlflow = start_tracking(out, labels.experiment)
    results: dict[str, dict] = {}
    test_rows, scores = None, {}  # the test rows' labels and coldness; variant -> (S, N)
    # The jobs of the throughput stage (no_content and ids), at the first ranker seed.
    timed_jobs: dict[str, TrainJob] = {}
    t = time.perf_counter()
    with mlflow.start_run(run_name=labels.run_name or f"bench-ranking-{embeddings_file.stem}") as parent:
        mlflow.log_params({"events": str(events_path), "item_embeddings": str(embeddings_path),
                           "nproc": nproc, "seed": seed, "streaming": streaming,
                           "quantizer": quantizer, "encoder": labels.encoder,
                           "task_signal": task_signal if "task_ids" in variants else "none",
                           "scale_sizes": ",".join(map(str, scale_sizes)),
                           "levels": levels,
                           "ranker_seeds": ",".join(map(str, ranker_seeds)),
                           **flat_params("ranker", asdict(config)),
                           **flat_params("quantizer", asdict(quantizers["mmtok"].config))})
        mlflow.log_metrics({f"quantizer.{name}.{k}": v for name, m in qmetrics.items()
                            for k, v in m.items() if isinstance(v, (int, float))})
        jobs: dict[str, list[TrainJob]] = {}
        for name in variants:
            job_variant, qname = table[name]
            job = TrainJob(
                split_dir=str(root / "split"), out=str(root / "variants" / name),
                variant=job_variant, item_embeddings=str(embeddings_file),
                item_codes=str(codes_files[qname]) if qname else None,
                quantizer=str(quantizer_dirs[qname]) if qname else None,
                streaming=streaming, ranker=config)
            jobs[name] = [replace(job, ranker=replace(config, seed=ranker_seed),
                                  out=f"{job.out}/seed-{ranker_seed}")
                          for ranker_seed in ranker_seeds]
            if name == STARTER_VARIANT:
                (out / "job.toml").write_text(
                    replace(jobs[name][0], out=str(root / "retrain" / name)).to_toml())
            if name in THROUGHPUT_VARIANTS:
                timed_jobs[name] = replace(job, ranker=replace(config, seed=ranker_seeds[0]))
        log(f"training {len(variants)} variants x {len(ranker_seeds)} seeds, "
            f"{workers} at a time")
        trained = launch_train_jobs([j for name in variants for j in jobs[name]],
                                    workers=workers, nproc=nproc,
                                    progress=progress and workers == 1, keep_checkpoints=False)
        bar = tqdm(total=len(variants) * len(ranker_seeds), desc="training runs", unit="run",
                   disable=not progress or workers == 1, leave=False)
        for name in variants:
            runs, probs = [], []
            for seeded in jobs[name]:
                runs.append(next(trained))
                bar.update(1)
                predicted = pl.read_parquet(Path(seeded.out) / PREDICTIONS_FILE)
                test_rows = predicted.select("label", "is_cold") if test_rows is None else test_rows
                probs.append(predicted["prob"].to_numpy())
                # One nested MLflow run per trained model, with its servable model.
                runs[-1]["mlflow_run_id"], _ = log_train_run(
                    seeded, runs[-1], nested=True,
                    run_name=f"{name}-seed{seeded.ranker.seed}")
            scores[name] = np.stack(probs)  # (S, N)
            metrics = _mean_over_seeds(runs)
            results[name] = metrics
            log(f"{name:>14}: test AUC {metrics['auc']:.4f} (warm {metrics['auc_warm']:.4f}, "
                f"cold {metrics['auc_cold']:.4f}), {metrics['train_examples_per_s']:,.0f} ex/s")
        bar.close()
        timings["rank_s"] = time.perf_counter() - t
        throughput = None
        if len(timed_jobs) == len(THROUGHPUT_VARIANTS):
            # One pass per variant is at the mercy of a shared machine's load bursts; this
            # takes short windows of each in turn and compares them round by round.
            t = time.perf_counter()
            throughput = interleaved_train_rates(
                {name: timed_jobs[name] for name in THROUGHPUT_VARIANTS}, progress=progress)
            timings["throughput_s"] = time.perf_counter() - t
            log(f"throughput: ids {throughput['ratio']['ids']:.2f}x no_content "
                f"(median of {throughput['rounds']} interleaved rounds)")
        loss = quantization_loss(results)
        t = time.perf_counter()
        intervals = comparison_intervals(test_rows["label"].to_numpy(),
                                         test_rows["is_cold"].to_numpy(), scores, seed=seed) \
            if test_rows is not None else {}
        timings["intervals_s"] = time.perf_counter() - t
        oracle = _oracle(out / "split" / "test.parquet", results)
        timings["total_s"] = earlier_s + time.perf_counter() - started
        dataset = labels.dataset or Path(events_path).parent.name or str(events_path)
        report = {
            "dataset": {"name": dataset,
                        "events_path": str(events_path), "item_embeddings_path": str(embeddings_path),
                        "items": len(emb), "embedding_dim": emb.dim,
                        "events": sum(split.summary[p]["rows"] for p in ("train", "valid", "test")),
                        "split": split.summary, "encoder": labels.encoder},
            "quantizer": qmetrics.get("mmtok"),
            "quantizers": qmetrics,
            "variants": results,
            "quantization_loss": loss,
            "intervals": intervals,
            "oracle": oracle,
            "throughput": throughput,
            "nproc": nproc,
            "train_workers": workers,
            "ranker": asdict(config),
            "ranker_seeds": list(ranker_seeds),
            "timings": timings,
            "mlflow_run_id": parent.info.run_id,
            # each variant's servable model, its first seed's (every seed has one)
            "models": {name: f"variants/{name}/seed-{ranker_seeds[0]}/{MODEL_DIR}"
                       for name in results},
        }
        (out / "metrics.json").write_text(json.dumps(report, indent=2, default=float))
        md = write_ranking_report(out, report,
                                  title=labels.title or f"mmtok bench-ranking - {dataset}")
        mlflow.log_metrics(dict(loss))
        for path in [out / "metrics.json", md, *out.glob("*.png")]:
            mlflow.log_artifact(str(path))
    log(f"done in {timings['total_s']:.0f}s: {md}")
    return report


def _fit_and_save(q, vectors: np.ndarray, engagement, directory: Path,
                  progress: bool) -> tuple[Path, float]:
    """Fits one quantizer (with the training period's engagement, for task-aware
    tokens), saves it to ``directory``; returns the directory and the fit's seconds."""
    started = time.perf_counter()
    q.fit(vectors, progress=progress, **({"engagement": engagement} if engagement else {}))
    fit_s = time.perf_counter() - started
    return save_quantizer(q, directory), fit_s


def fit_quantizers(quantizers: dict, emb, train_events: Path, root: Path, *, seed: int,
                   progress: bool, log=print, workers: int = 1) -> tuple[dict, dict, dict]:
    """Fits each quantizer (name -> unfitted) on the items with training events only and
    writes every item's codes to ``root/codes/<name>.parquet`` and the quantizer to
    ``root/quantizers/<name>``; returns (metrics, codes files, quantizer dirs) by name.

    The held-out cold items are encoded out of sample, as a brand-new ad would be, and
    the metrics are measured on them. ``task_mmtok`` (task-aware tokens) also learns
    from ``train_events``, the training period's events: nothing of the validation or
    test periods, so a cold item's codes come from its content alone.

    With ``workers`` > 1 the fits run side by side in as many worker processes (every
    fit is seeded, and its codes do not depend on the process or its thread count).
    Either way each quantizer is measured as saved and loaded back, the quantizer the
    ranker's jobs and the server read, and the encode rate here, one at a time.
    """
    qmetrics, codes_files, quantizer_dirs = {}, {}, {}
    trained_items = pl.scan_parquet(train_events).select(pl.col("item_id").unique()).collect()
    seen = np.isin(emb.item_ids, trained_items["item_id"].to_numpy())
    largest = max((max(q.codebook_sizes) for q in quantizers.values()), default=0)
    if seen.sum() < largest:
        raise ValueError(f"only {int(seen.sum())} items have training events: a codebook of "
                         f"{largest} codes needs at least that many to fit")
    unseen = ~seen if (~seen).sum() >= 50 else np.ones_like(seen)  # metrics need rows
    measured_on = ("items without training events" if (~seen).sum() >= 50
                   else "all items (fewer than 50 without training events)")

    def metrics_of_fitted(name: str, q, fit_s: float) -> None:
        """Encodes every item with the fitted ``q``, writes the codes, measures them."""
        q.encode(emb.vectors[:256])  # warm-up: the first encode of a process pays its setup
        encode_started = time.perf_counter()
        frame = encode_items(q, emb)
        encode_per_s = len(emb) / max(time.perf_counter() - encode_started, 1e-9)
        codes_files[name] = root / "codes" / f"{name}.parquet"
        codes_files[name].parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(codes_files[name])
        codes = frame.select(q.code_names).to_numpy()
        qmetrics[name] = {"kind": q.kind, "code_names": q.code_names,
                          "codebook_sizes": list(q.codebook_sizes),
                          "fit_items": int(seen.sum()),
                          "measured_on": measured_on,
                          "measured_items": int(unseen.sum()),
                          "fit_s": fit_s, "encode_items_per_s": encode_per_s,
                          **({"training": q.training_summary}
                             if getattr(q, "training_summary", None) else {}),
                          **quantizer_metrics(emb.vectors[unseen], codes[unseen],
                                              q.decode(codes[unseen]), q.codebook_sizes,
                                              seed=seed)}
        if name == "task_mmtok" and "mmtok" in codes_files:
            # the share of items the task moved to another code tuple than content gives
            content_codes = pl.read_parquet(codes_files["mmtok"]).select(q.code_names).to_numpy()
            qmetrics[name]["tuples_differ_from_content"] = float(
                (content_codes != codes).any(1).mean())
        log(f"{name}: {len(q.code_names)} IDs, rel_mse {qmetrics[name]['rel_mse']:.3f}, "
            f"recall@10 {qmetrics[name]['recall_at_10']:.3f}, fit {fit_s:.0f}s")

    engagement = None
    if "task_mmtok" in quantizers:  # behaviour from the training period only
        engagement = Engagement.from_events(
            pl.read_parquet(train_events, columns=["user_id", "item_id", "label"]),
            emb.item_ids[seen])
    fits = {name: (q, emb.vectors[seen], engagement if name == "task_mmtok" else None,
                   root / "quantizers" / name) for name, q in quantizers.items()}
    workers = min(workers, len(fits))
    pool = worker_pool(workers, share_cores=True) if workers > 1 else None
    try:
        if pool:
            futures = {name: pool.submit(_fit_and_save, *args, False)
                       for name, args in fits.items()}
        for name in quantizers:
            if pool:
                quantizer_dirs[name], fit_s = futures[name].result()
            else:
                quantizer_dirs[name], fit_s = _fit_and_save(*fits[name], progress)
            # measured as saved: the quantizer the ranker's jobs and the server load
            metrics_of_fitted(name, load_quantizer(quantizer_dirs[name]), fit_s)
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    return qmetrics, codes_files, quantizer_dirs


def _oracle(test_path: Path, results: dict[str, dict]) -> dict | None:
    """When the events carry their true click logit (``mmdata.ORACLE_COLUMN``, as the
    synthetic world's do): the oracle's AUC on the test rows (overall, warm, cold) and
    the share of the gap from ``no_content`` to it that each variant closes."""
    test = pl.read_parquet(test_path)
    if ORACLE_COLUMN not in test.columns:
        return None
    oracle = ranking_metrics(test["label"].to_numpy(),
                             1 / (1 + np.exp(-test[ORACLE_COLUMN].to_numpy().astype(np.float64))),
                             test["is_cold"].to_numpy())
    out = {k: oracle[k] for k in ("auc", "auc_warm", "auc_cold")}
    if "no_content" in results:
        base = results["no_content"]["auc"]
        out["gap_closed"] = {name: (m["auc"] - base) / (oracle["auc"] - base)
                             for name, m in results.items()}
    return out


def _mean_over_seeds(runs: list[dict]) -> dict:
    """Numeric metrics averaged over seeded runs; the first run's history; a metric that
    some runs leave empty (``tables_restarted_from_epoch``: None where patience never ran
    out) as the list of each run's."""
    out = dict(runs[0])
    for key in runs[0]:
        values = [r.get(key) for r in runs]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = float(np.mean(values))
        elif any(v is None for v in values):
            out[key] = values
    out["auc_seeds"] = [r["auc"] for r in runs]
    out["auc_cold_seeds"] = [r["auc_cold"] for r in runs]
    # The sample standard deviation (n - 1): with three seeds the population one reads
    # a fifth low.
    out["auc_std"] = float(np.std(out["auc_seeds"], ddof=1)) if len(runs) > 1 else 0.0
    return out
