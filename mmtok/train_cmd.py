"""``mmtok train --config job.toml``: one ranker training job, in this process or as
one rank of ``torchrun --nproc_per_node=N -m mmtok.cli train ...``; rank 0 logs the
run to MLflow (params, per-epoch curves, test metrics, the model files)."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mmtok.tracking import flat_params, start_tracking
from ranker.job import TrainJob, run_train_job


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


def log_train_run(job: TrainJob, metrics: dict, *, run_name: str, nested: bool = False) -> str:
    """Logs one trained variant to MLflow; returns the run id."""
    import mlflow

    if not nested:  # a nested run goes under the caller's tracking set-up and parent run
        start_tracking(Path(job.out), "mmtok-train")
    with mlflow.start_run(run_name=run_name, nested=nested) as run:
        mlflow.log_params({"variant": job.variant, "split_dir": job.split_dir,
                           "item_codes": str(job.item_codes), "streaming": job.streaming,
                           "world_size": metrics.get("world_size", 1),
                           **flat_params("ranker", asdict(job.ranker))})
        for row in metrics.get("history", []):
            mlflow.log_metrics({"train_loss": row["train_loss"], "valid_auc": row["valid_auc"]},
                               step=row["epoch"])
        mlflow.log_metrics({f"test_{k}": float(v) for k, v in metrics.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)
                            and np.isfinite(v)})
        out = Path(job.out)
        for name in ("metrics.json", "job.toml"):
            if (out / name).exists():
                mlflow.log_artifact(str(out / name))
        if (out / "model").is_dir():
            mlflow.log_artifacts(str(out / "model"), artifact_path="model")
        return run.info.run_id


def run_train_command(config: Path, *, resume: bool, progress: bool, out: Path | None = None,
                      track: bool = True, max_steps: int | None = None) -> dict:
    job = TrainJob.from_toml(config, out=str(out) if out else None)
    joined = init_from_torchrun()
    try:
        metrics = run_train_job(job, resume=resume, progress=progress, stop_after_steps=max_steps)
        if "auc" not in metrics:
            return metrics
        if track and (not dist.is_initialized() or dist.get_rank() == 0):
            metrics["mlflow_run_id"] = log_train_run(job, metrics, run_name=f"train-{job.variant}")
    finally:
        if joined:
            dist.destroy_process_group()
    return metrics
