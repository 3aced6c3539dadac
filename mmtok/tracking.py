"""MLflow set-up: a sqlite tracking store under the run directory unless
``MLFLOW_TRACKING_URI`` says otherwise; artifacts beside it."""

from __future__ import annotations

import logging
import os
from pathlib import Path


def start_tracking(out_dir: Path, experiment: str):
    """Points MLflow at ``out_dir`` (or ``$MLFLOW_TRACKING_URI``) and returns the module."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") \
            else (out_dir / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment)
    return mlflow


def flat_params(prefix: str, values: dict) -> dict[str, str]:
    """A config dict as MLflow params (``prefix.key``), lists joined by commas."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        out[f"{prefix}.{key}"] = str(value)
    return out
