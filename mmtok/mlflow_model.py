"""A servable model as an MLflow model: the ``ranker.bundle`` directory logged under the
``python_function`` flavor, loaded by this module (no pickle, no code copied into the run).

    runs:/<run id>/model/          (or models:/<name>/<version>, models:/<name>@<alias>)
      MLmodel                      python_function, loader_module mmtok.mlflow_model
      data/model/                  the bundle: bundle.json, ranker.safetensors, ...

Example::

    model = mlflow.pyfunc.load_model("runs:/<run id>/model")
    probs = model.predict(events_df)     # (n,) click probabilities
    # mmtok serve --model runs:/<run id>/model   serves the same bundle

Loading needs mmtok installed where it runs (the loader module is mmtok's own); the
logged requirements pin the libraries it imports to the versions that trained it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import polars as pl

from ranker.bundle import MANIFEST, NEW_ITEM, BundleError, ServableModel

# The packages a loaded model imports, pinned to this environment's versions (naming
# them spares MLflow inferring them by loading the model in a subprocess).
_REQUIREMENTS = ("torch", "torchrec", "fbgemm-gpu-cpu", "numpy", "polars", "safetensors",
                 "faiss-cpu", "triton")


class RankerPyfunc:
    """What ``mlflow.pyfunc.load_model`` returns the ``predict`` of.

    ``predict(events)``: a frame (pandas or polars) with ``user_id``, ``item_id`` and the
    model's ``cat_*`` / ``dense_*`` columns, one row per event; an item the model does not
    know needs an ``embedding`` column (a list of floats) holding its embedding, as a
    brand-new ad does in a Score request. Returns (n,) float32 click probabilities.
    """

    def __init__(self, model: ServableModel) -> None:
        self.model = model

    def predict(self, model_input, params=None) -> np.ndarray:
        events = model_input if isinstance(model_input, pl.DataFrame) else pl.from_pandas(model_input)
        new_embeddings = None
        content_row = self.model.content_rows(events["item_id"].to_numpy())  # looked up once
        if "embedding" in events.columns:
            new = content_row == NEW_ITEM
            if self.model.needs_content and new.any():
                sent = events.filter(pl.Series(new))
                lacking = sent.filter(pl.col("embedding").is_null())
                if lacking.height:
                    raise ValueError(f"item_id {lacking['item_id'][0]} is unknown to model "
                                     f"{self.model.model_version} and its embedding is empty "
                                     f"({lacking.height} such rows)")
                new_embeddings = np.array(sent["embedding"].to_list(), dtype=np.float32)
            events = events.drop("embedding")
        return self.model.score_events(events, new_embeddings, content_row=content_row)


def _load_pyfunc(data_path: str) -> RankerPyfunc:
    """MLflow's entry point for the ``python_function`` flavor."""
    return RankerPyfunc(ServableModel.load(data_path))


def bundle_directory(directory: str | Path) -> Path:
    """The bundle inside a downloaded MLflow model directory (or ``directory`` itself
    when it is a bundle)."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file() or not (directory / "MLmodel").is_file():
        return directory
    from mlflow.models import Model

    flavor = Model.load(str(directory)).flavors.get("python_function", {})
    if flavor.get("loader_module") != __name__ or "data" not in flavor:
        raise BundleError(f"{directory}: an MLflow model, but not one mmtok logged (its "
                          f"python_function flavor is {flavor.get('loader_module')!r})")
    return directory / flavor["data"]


def log_model(bundle: Path, *, register: str | None = None) -> str | None:
    """Logs ``bundle`` as the active run's ``model``; with ``register``, also as a new
    version of that registered model, whose number it returns (else None)."""
    import mlflow

    requirements = []
    for package in _REQUIREMENTS:
        try:
            # Without the local tag (2.13.0+cpu): the registry's name for the release.
            requirements.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            continue
    info = mlflow.pyfunc.log_model(name="model", loader_module=__name__, data_path=str(bundle),
                                   pip_requirements=requirements, registered_model_name=register)
    return None if register is None else str(info.registered_model_version)
