"""``mmtok train --config job.toml``: one ranker training job, in this process or as
one rank of ``torchrun --nproc_per_node=N -m mmtok.cli train ...``; rank 0 logs the
run to MLflow (params, per-epoch curves, the restored best step's metrics, and the
servable model as the run's MLflow model, optionally registered).

``train_job`` is the one way a ranker is trained, here or under torchrun: ``mmtok demo``
and ``mmtok bench-ranking`` run every variant and seed through it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mmtok.mlflow_model import log_model
from mmtok.quiet import quiet_library_warnings
from mmtok.tracking import flat_params, start_tracking
from ranker.job import MODEL_DIR, TrainJob, run_train_job

# What a run's test metrics are logged as (metrics.json's key -> MLflow metric).
_TEST_METRICS = ("auc", "auc_warm", "auc_cold", "logloss", "logloss_warm", "logloss_cold", "ne")


def init_from_torchrun() -> bool:
    """Joins the process group torchrun describes (nccl on GPU, gloo on CPU);
    False when not started by torchrun."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return True


def log_train_run(job: TrainJob, metrics: dict, *, run_name: str, nested: bool = False,
                  register: str | None = None) -> tuple[str, str | None]:
    """Logs one trained job to MLflow with its servable model as the run's ``model``
    (``runs:/<id>/model``; with ``register``, a new version of that registered model).
    Returns the run id and the registered version (None without ``register``)."""
    import mlflow

    if not nested:  # a nested run goes under the caller's tracking set-up and parent run
        start_tracking(Path(job.out), "mmtok-train")
    with mlflow.start_run(run_name=run_name, nested=nested) as run:
        mlflow.log_params({"variant": job.variant, "split_dir": job.split_dir,
                           "item_codes": str(job.item_codes), "quantizer": str(job.quantizer),
                           "streaming": job.streaming,
                           "world_size": metrics.get("world_size", 1),
                           "model_version": metrics.get("model_version", ""),
                           **flat_params("ranker", asdict(job.ranker))})
        # The curves by training step under names of their own: MLflow shows a metric's
        # value at its highest step, which would hide the restored best step's valid_auc.
        for row in metrics.get("history", []):
            mlflow.log_metrics({"train_loss_by_step": row["train_loss"],
                                "valid_auc_by_step": row["valid_auc"]}, step=row["step"])
        final = {f"test_{k}": metrics[k] for k in _TEST_METRICS if k in metrics}
        # The model the run keeps is the best epoch's: its validation AUC, not the last one's.
        final |= {k: metrics[k] for k in ("valid_auc", "best_epoch", "best_step",
                                           "train_examples_per_s") if k in metrics}
        mlflow.log_metrics({k: float(v) for k, v in final.items() if np.isfinite(v)})
        out = Path(job.out)
        for name in ("metrics.json", "job.toml"):
            if (out / name).exists():
                mlflow.log_artifact(str(out / name))
        version = log_model(out / MODEL_DIR, register=register) if (out / MODEL_DIR).is_dir() \
            else None
        return run.info.run_id, version


def launch_train_job(job: TrainJob, *, nproc: int = 1, progress: bool = True,
                     keep_checkpoints: bool = True) -> dict:
    """Trains one job, in this process (``nproc`` 1) or under ``torchrun`` with ``nproc``
    gloo/nccl processes; returns its metrics. ``keep_checkpoints=False`` deletes a
    finished run's checkpoints (they serve ``--resume`` only; the model stays)."""
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    if nproc == 1:
        metrics = run_train_job(job, progress=progress)
    else:
        config = out / "job.toml"
        config.write_text(job.to_toml())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "mmtok.cli", "train", "--config", str(config),
               "--no-track", *([] if progress else ["--quiet"])]
        env = {**os.environ, "OMP_NUM_THREADS": str(job.ranker.num_threads)}
        proc = subprocess.run(cmd, env=env, capture_output=not progress, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun failed for {job.variant} ({proc.returncode}): "
                               f"{(proc.stderr or '')[-2000:]}")
        metrics = json.loads((out / "metrics.json").read_text())
    if not keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return metrics


def default_train_workers(num_threads: int, nproc: int = 1) -> int:
    """How many training runs fit side by side: the cores this process may use, over
    the cores one run takes (its ``num_threads`` in each of its ``nproc`` processes)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1  # macOS has no affinity mask
    return max(1, cores // max(1, num_threads * nproc))


def worker_pool(workers: int, *, share_cores: bool = False) -> ProcessPoolExecutor:
    """``workers`` fresh ("spawn") worker processes for a bench's independent jobs, each
    silencing the library warnings the command line silences. ``share_cores``: each
    also takes its share of the cores for torch and faiss, for jobs (quantizer fits)
    that would otherwise each use them all; a training run sets its own threads."""
    return ProcessPoolExecutor(max_workers=workers,
                               mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker,
                               initargs=(workers if share_cores else 0,))


def _start_worker(share_of: int) -> None:
    quiet_library_warnings()
    if share_of:
        import faiss

        threads = max(1, torch.get_num_threads() // share_of)
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)


def launch_train_jobs(jobs: list[TrainJob], *, workers: int = 1, nproc: int = 1,
                      progress: bool = True, keep_checkpoints: bool = True) -> Iterator[dict]:
    """Trains independent jobs (a bench's variants and seeds), ``workers`` at a time,
    and yields their metrics in the jobs' order, each as soon as it and those before it
    are done. One worker trains them here, one by one, as ``launch_train_job`` does.
    More train them, quiet, in as many worker processes (started fresh, each importing
    the stack once and then taking one job after another); a run is seeded and
    single-process deterministic, so its results are those it has when run alone."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield launch_train_job(job, nproc=nproc, progress=progress,
                                   keep_checkpoints=keep_checkpoints)
        return
    pool = worker_pool(min(workers, len(jobs)))
    try:
        futures = [pool.submit(launch_train_job, job, nproc=nproc, progress=False,
                               keep_checkpoints=keep_checkpoints) for job in jobs]
        for future in futures:
            yield future.result()
    finally:  # on an error, or a caller that stops early: no new runs start
        pool.shutdown(wait=True, cancel_futures=True)


def run_train_command(config: Path, *, resume: bool, progress: bool, out: Path | None = None,
                      variant: str | None = None, track: bool = True,
                      register: str | None = None, max_steps: int | None = None) -> dict:
    """``mmtok train``: the job file, with ``--out`` / ``--variant`` replacing its keys."""
    job = TrainJob.from_toml(config, out=str(out) if out else None, variant=variant)
    if register and not track:
        raise ValueError("--register needs the MLflow run (drop --no-track)")
    joined = init_from_torchrun()
    try:
        metrics = run_train_job(job, resume=resume, progress=progress, stop_after_steps=max_steps)
        if "auc" not in metrics:
            return metrics
        metrics["model_dir"] = str(Path(job.out) / MODEL_DIR)
        if track and (not dist.is_initialized() or dist.get_rank() == 0):
            metrics["mlflow_run_id"], metrics["registered_version"] = log_train_run(
                job, metrics, run_name=f"train-{job.variant}", register=register)
            import mlflow

            metrics["mlflow_tracking_uri"] = mlflow.get_tracking_uri()
    finally:
        if joined:
            dist.destroy_process_group()
    return metrics
