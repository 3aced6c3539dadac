"""A servable model: everything the online server needs to score candidates, in one
directory that loads without pickle.

    model/
      bundle.json          format, model_version, ranker config, feature settings,
                           and the sha256 of every file below
      ranker.safetensors   the RankingModel's state dict
      tables.safetensors   id vocabularies, dense-context standardization, and the
                           known items' content (item ids, content codes / vectors)
      quantizer/           the quantizer that made the codes, in its own save format
                           (absent when the model reads only the dense embedding)

A candidate whose item is in the content table is scored with the table's codes, as
offline; an unknown item (a brand-new ad) must bring its embedding, which the
quantizer turns into codes on the fly, while its item id maps to the shared
out-of-vocabulary row exactly as a cold item's does offline.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import safetensors.numpy
import safetensors.torch
import torch

from mmdata.contracts import validate_embedding_matrix
from quantizer import Quantizer, load_quantizer, save_quantizer
from ranker.features import FeatureEncoder, ItemContent
from ranker.model import RankerConfig, RankingModel

BUNDLE_FORMAT = "mmtok-servable-model"
# 2: content IDs as multi-hot bag features over stacked tables (one per interaction slot).
BUNDLE_FORMAT_VERSION = 2
MANIFEST = "bundle.json"
# The content row of a candidate whose item has none: a brand-new ad, whose content
# comes from the embedding it brings.
NEW_ITEM = -1


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BundleError(ValueError):
    """A model directory is not a complete, consistent servable model. Names the file."""


@dataclass
class ServableModel:
    """A trained ranker with its fitted features and quantizer, ready to score.

    Args:
        model: the trained ranker (put in eval mode).
        features: the ``FeatureEncoder`` it was trained with, over the known items' content.
        config: its architecture.
        quantizer: tokenizes brand-new ads; required when the model reads content IDs or
            reconstructions (a model that reads only the dense embedding needs none).
        content_vectors: what the model's dense content input is: ``"embedding"`` (the
            item's embedding), ``"recon"`` (``decode(encode(embedding))``) or None.
        model_version: names this model in every response; set by ``save``.

    Example::

        ServableModel(trained.model, features, config, quantizer=q).save("runs/x/model")
        served = ServableModel.load("runs/x/model")
        probs = served.score_events(events, new_embeddings)  # (n,) float32
    """

    model: RankingModel
    features: FeatureEncoder
    config: RankerConfig
    quantizer: Quantizer | None = None
    content_vectors: str | None = None
    model_version: str = ""

    def __post_init__(self) -> None:
        self.model.eval()
        f = self.features
        if f.use_dense_content != (self.content_vectors is not None):
            raise ValueError(f"content_vectors={self.content_vectors!r} does not match the "
                             f"features' use_dense_content={f.use_dense_content}")
        if self.content_vectors not in (None, "embedding", "recon"):
            raise ValueError(f"content_vectors must be None, 'embedding' or 'recon', "
                             f"got {self.content_vectors!r}")
        if self.needs_quantizer and self.quantizer is None:
            raise ValueError("a model that reads content IDs or reconstructions needs the "
                             "quantizer that tokenizes new items")
        if f.use_codes and list(self.quantizer.code_names) != list(f.content.code_names):
            raise ValueError(f"quantizer codes {self.quantizer.code_names} differ from the "
                             f"model's {f.content.code_names}")
        if f.use_dense_content and self.quantizer is not None and \
                self.quantizer.dim != f.content.vectors.shape[1]:
            raise ValueError(f"the quantizer takes {self.quantizer.dim}-wide embeddings, the "
                             f"content vectors are {f.content.vectors.shape[1]} wide")

    @property
    def needs_content(self) -> bool:
        """Whether an unknown item must bring its embedding."""
        return self.features.use_codes or self.features.use_dense_content

    @property
    def needs_quantizer(self) -> bool:
        """Whether scoring a new item takes the quantizer (content IDs or reconstructions)."""
        return self.features.use_codes or self.content_vectors == "recon"

    @property
    def embedding_dim(self) -> int | None:
        """Width of a new item's embedding: the content vectors' for a dense-content
        model, else the quantizer's input (None when there is neither)."""
        if self.features.use_dense_content:
            return int(self.features.content.vectors.shape[1])
        return None if self.quantizer is None else int(self.quantizer.dim)

    def content_rows(self, item_ids: np.ndarray) -> np.ndarray:
        """(n,) int64: each item's row in the content table, ``NEW_ITEM`` if it has none."""
        rows, found = self.features.content.find(item_ids)
        return np.where(found, rows, NEW_ITEM)

    def tokenize(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, d) float32 checked embeddings (width, finite) -> (n, c) int64 content codes."""
        return self.quantizer.encode(embeddings, validate=False)

    @torch.inference_mode()
    def score_candidates(self, events: pl.DataFrame, content_row: np.ndarray,
                         new_embeddings: np.ndarray) -> np.ndarray:
        """Click probabilities for checked candidates, in one forward pass. Nothing is
        looked up or checked again: ``mmtok.serving.requests`` did that (offline,
        ``score_events`` does).

        Args:
            events: (n rows) ``user_id``, ``item_id`` and the model's ``cat_*`` /
                ``dense_*`` context columns, as in the events contract.
            content_row: (n,) int64 each candidate's row in the content table
                (``content_rows``), ``NEW_ITEM`` for an item without one.
            new_embeddings: (m, d) float32 finite embeddings of the ``NEW_ITEM``
                candidates, in candidate order (m may be 0; a model that reads no
                content ignores them).

        Returns:
            (n,) float32 probabilities, the numbers ``ranker.predict`` gives offline
            for the same events once the new items are in the content table.
        """
        f = self.features
        n = events.height
        encoded = f.encode(events, content_row=content_row)  # id rows and context, as offline
        new = content_row == NEW_ITEM
        known_rows = content_row[~new]
        any_new = self.needs_content and bool(new.any())
        new_codes = self.quantizer.encode(new_embeddings, validate=False) \
            if any_new and self.needs_quantizer else None  # (m, c)
        content = vectors = None
        if f.use_codes:  # known items' rows precomputed, new ads' from their codes
            content = f.candidate_content(content_row, new_codes)
        if f.use_dense_content:
            dense_content = np.empty((n, self.embedding_dim), dtype=np.float32)  # (n, d)
            dense_content[~new] = f.content.vectors[known_rows]
            if any_new:
                dense_content[new] = new_embeddings if self.content_vectors == "embedding" \
                    else self.quantizer.decode(new_codes)
            vectors = torch.from_numpy(dense_content)
        dense, kjt = f.model_inputs(encoded.sparse, encoded.dense_ctx, content, vectors)
        return torch.sigmoid(self.model(dense, kjt)).numpy()

    def score_events(self, events: pl.DataFrame, new_embeddings: np.ndarray | None = None,
                     *, content_row: np.ndarray | None = None) -> np.ndarray:
        """``score_candidates`` for an events frame, offline: looks the items up and
        checks the new items' embeddings itself.

        Args:
            events: (n rows) as in ``score_candidates``.
            new_embeddings: (m, d) float32 embeddings of the rows whose item is not in
                the content table, in row order; None if there is none (or the model
                reads no content).
            content_row: (n,) the events' rows in the content table (``content_rows``),
                if the caller looked them up already.

        Returns:
            (n,) float32 probabilities.
        """
        if content_row is None:
            content_row = self.content_rows(events["item_id"].to_numpy())
        m = int((content_row == NEW_ITEM).sum()) if self.needs_content else 0
        given = 0 if new_embeddings is None else len(new_embeddings)
        if self.needs_content and given != m:
            raise ValueError(f"{m} events' items have no row in the content table: pass "
                             f"their {m} embeddings, got {given}")
        if m == 0:
            new_embeddings = np.zeros((0, self.embedding_dim or 0), dtype=np.float32)
        else:
            new_embeddings = validate_embedding_matrix(np.asarray(new_embeddings), "new_embeddings",
                                                       expected_dim=self.embedding_dim)
        return self.score_candidates(events, content_row, new_embeddings)

    # ---------------------------------------------------------------- save / load

    def save(self, directory: str | Path, *, name: str = "model") -> Path:
        """Writes the bundle; ``bundle.json`` last. Sets ``model_version`` to
        ``<name>-<first 12 hex digits of the content hash>``.

        To replace a model that a server watches, save into a new directory and then
        repoint a symlink (``os.replace`` of a fresh link) rather than overwrite in place.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        f = self.features
        meta, arrays = f.state()
        content = f.content
        arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        arrays["item_ids"] = np.ascontiguousarray(content.item_ids)
        if f.use_codes:
            arrays["item_codes"] = np.ascontiguousarray(content.codes, dtype=np.int64)
        if f.use_dense_content:
            arrays["item_vectors"] = np.ascontiguousarray(content.vectors, dtype=np.float32)
        files = {
            "ranker.safetensors": safetensors.torch.save(
                {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}),
            "tables.safetensors": safetensors.numpy.save(arrays),
        }
        for fname, data in files.items():
            (directory / fname).write_bytes(data)
        hashes = {fname: _sha256(data) for fname, data in files.items()}
        shutil.rmtree(directory / "quantizer", ignore_errors=True)  # no stale files in a re-save
        if self.quantizer is not None:
            qdir = save_quantizer(self.quantizer, directory / "quantizer")
            for path in sorted(qdir.iterdir()):
                hashes[f"quantizer/{path.name}"] = _sha256(path.read_bytes())
        digest = _sha256(json.dumps(hashes, sort_keys=True).encode())
        self.model_version = f"{name}-{digest[:12]}"
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "model_version": self.model_version,
            "ranker": asdict(self.config),
            "features": {**meta, "code_names": list(content.code_names),
                         "codebook_sizes": list(content.codebook_sizes),
                         "sparse_names": f.sparse_names},
            "content_vectors": self.content_vectors,
            "quantizer": "quantizer" if self.quantizer is not None else None,
            "files": hashes,
        }
        tmp = directory / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2))
        tmp.replace(directory / MANIFEST)  # atomic: a reader sees the old or the new manifest
        return directory

    @staticmethod
    def read_manifest(directory: str | Path) -> dict:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise BundleError(f"{directory}: no {MANIFEST} - not a servable model directory "
                              "(`mmtok demo --out DIR` writes one at DIR/model)")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise BundleError(f"{path}: not valid JSON ({exc})") from exc
        if manifest.get("format") != BUNDLE_FORMAT or \
                manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
            raise BundleError(f"{path}: format {manifest.get('format')!r} version "
                              f"{manifest.get('format_version')!r}, expected {BUNDLE_FORMAT!r} "
                              f"version {BUNDLE_FORMAT_VERSION} (a model saved by another mmtok "
                              "version: train it again, or serve it with that version)")
        return manifest

    @classmethod
    def load(cls, directory: str | Path) -> "ServableModel":
        """Loads and checks a bundle: every file must match the manifest's sha256 (a
        torn copy is refused, not half-loaded); tensors come from safetensors only."""
        directory = Path(directory)
        manifest = cls.read_manifest(directory)
        blobs = {}
        for fname, expected in manifest["files"].items():
            path = directory / fname
            if not path.is_file():
                raise BundleError(f"{path}: missing (listed in {MANIFEST})")
            data = path.read_bytes()
            if _sha256(data) != expected:
                raise BundleError(f"{path}: sha256 differs from {MANIFEST} (a partial or "
                                  "mixed copy?)")
            blobs[fname] = data
        spec = manifest["features"]
        try:
            arrays = safetensors.numpy.load(blobs["tables.safetensors"])
            state = safetensors.torch.load(blobs["ranker.safetensors"])
        except Exception as exc:  # safetensors raises its own error types
            raise BundleError(f"{directory}: cannot read tensors: {exc}") from exc
        content = ItemContent(arrays["item_ids"], vectors=arrays.get("item_vectors"),
                              codes=arrays.get("item_codes"), code_names=spec["code_names"],
                              codebook_sizes=spec["codebook_sizes"])
        features = FeatureEncoder.from_state(spec, arrays, content)
        if features.sparse_names != spec["sparse_names"]:
            raise BundleError(f"{directory / MANIFEST}: sparse_names {spec['sparse_names']} "
                              f"!= the tables' {features.sparse_names}")
        config = RankerConfig(**manifest["ranker"])
        model = RankingModel.of(features, config)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise BundleError(f"{directory / 'ranker.safetensors'}: does not fit the model "
                              f"the manifest describes: {exc}") from exc
        quantizer = None
        if manifest["quantizer"] is not None:
            qdir = directory / manifest["quantizer"]
            try:
                quantizer = load_quantizer(qdir)
            except Exception as exc:  # each kind's load (safetensors, faiss) raises its own types
                raise BundleError(f"{qdir}: cannot load the quantizer: {exc}") from exc
        return cls(model=model, features=features, config=config, quantizer=quantizer,
                   content_vectors=manifest["content_vectors"],
                   model_version=manifest["model_version"])
