"""MLflow set-up: a sqlite tracking store under the run directory unless
``MLFLOW_TRACKING_URI`` says otherwise; artifacts beside it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

# The run-directory stores this process pointed MLflow at. mlflow.set_tracking_uri also
# exports the URI as $MLFLOW_TRACKING_URI (for subprocesses), so a second job in the same
# process would otherwise read the first job's store as the user's choice and log there.
_RUN_DIR_STORES: set[str] = set()


def start_tracking(out_dir: Path, experiment: str):
    """Points MLflow at ``out_dir`` (or ``$MLFLOW_TRACKING_URI``, when the user set it)
    and returns the module."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    user_uri = env if env and env not in _RUN_DIR_STORES else None
    uri = user_uri or f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"
    if user_uri is None:
        _RUN_DIR_STORES.add(uri)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        artifacts = None if user_uri else (out_dir / "mlartifacts").resolve().as_uri()
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
