"""A servable model: everything the online server needs to score candidates, in one
directory that loads without pickle.

    model/
      bundle.json          format, model_version, ranker config, feature settings,
                           and the sha256 of every file below
      ranker.safetensors   the RankingModel's state dict
      tables.safetensors   id vocabularies, dense-context standardization, and the
                           known items' content (item ids, content codes / vectors)
      quantizer/           the quantizer that made the codes, in its own save format

A candidate whose item is in the content table is scored with the table's codes, as
offline; an unknown item (a brand-new ad) must bring its embedding, which the
quantizer turns into codes on the fly, while its item id maps to the shared
out-of-vocabulary row exactly as a cold item's does offline.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import safetensors.numpy
import safetensors.torch
import torch

from ranker.features import FeatureEncoder, ItemContent
from ranker.model import RankerConfig, RankingModel

BUNDLE_FORMAT = "mmtok-servable-model"
# 2: content IDs as multi-hot bag features over stacked tables (one per interaction slot).
BUNDLE_FORMAT_VERSION = 2
MANIFEST = "bundle.json"


def _quantizer_classes() -> dict:
    from quantizer.mmdict import MmDictQuantizer
    from quantizer.residual_kmeans import ResidualKMeansQuantizer

    return {cls.kind: cls for cls in (ResidualKMeansQuantizer, MmDictQuantizer)}


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
        quantizer: tokenizes brand-new ads; required when the model reads content.
        content_vectors: what the model's dense content input is: ``"embedding"`` (the
            item's embedding), ``"recon"`` (``decode(encode(embedding))``) or None.
        model_version: names this model in every response; set by ``save``.

    Example::

        ServableModel(trained.model, features, config, quantizer=q).save("runs/x/model")
        served = ServableModel.load("runs/x/model")
        probs = served.score_candidates(events, new_embeddings)  # (n,) float32
    """

    model: RankingModel
    features: FeatureEncoder
    config: RankerConfig
    quantizer: object | None = None
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
        if self.needs_content and self.quantizer is None:
            raise ValueError("a model that reads item content needs the quantizer that "
                             "tokenizes new items")
        if f.use_codes and list(self.quantizer.code_names) != list(f.content.code_names):
            raise ValueError(f"quantizer codes {self.quantizer.code_names} differ from the "
                             f"model's {f.content.code_names}")

    @property
    def needs_content(self) -> bool:
        """Whether an unknown item must bring its embedding."""
        return self.features.use_codes or self.features.use_dense_content

    @property
    def embedding_dim(self) -> int | None:
        """Width of the embeddings the quantizer takes (None without a quantizer)."""
        return None if self.quantizer is None else int(self.quantizer.dim)

    def known_items(self, item_ids: np.ndarray) -> np.ndarray:
        """(n,) bool: the item has a row in the content table."""
        return self.features.content.find(item_ids)[1]

    def tokenize(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, d) float32 -> (n, c) int64 content codes."""
        return self.quantizer.encode(embeddings)

    @torch.inference_mode()
    def score_candidates(self, events: pl.DataFrame, new_embeddings: np.ndarray | None
                         ) -> np.ndarray:
        """Click probabilities for events, in one forward pass.

        Args:
            events: (n rows) ``user_id``, ``item_id`` and the model's ``cat_*`` /
                ``dense_*`` context columns, as in the events contract.
            new_embeddings: (m, d) float32, the embeddings of the rows whose item is
                not in the content table, in row order (m may be 0).

        Returns:
            (n,) float32 probabilities, the numbers ``ranker.predict`` gives offline
            for the same events once the new items are in the content table.
        """
        f = self.features
        n = events.height
        rows, known = f.content.find(events["item_id"].to_numpy())
        new = ~known
        codes = vectors = None
        if f.use_codes:
            codes = np.empty((n, len(f.content.code_names)), dtype=np.int64)  # (n, C)
            codes[known] = f.content.codes[rows[known]]
        if f.use_dense_content:
            vectors = np.empty((n, f.content.vectors.shape[1]), dtype=np.float32)  # (n, D)
            vectors[known] = f.content.vectors[rows[known]]
        if new.any() and self.needs_content:
            new_codes = self.quantizer.encode(new_embeddings)  # (m, C)
            if codes is not None:
                codes[new] = new_codes
            if vectors is not None:
                vectors[new] = new_embeddings if self.content_vectors == "embedding" \
                    else self.quantizer.decode(new_codes)
        # One content row per candidate: offline code path, request-local content.
        content = ItemContent(events["item_id"].to_numpy(), vectors=vectors, codes=codes,
                              code_names=list(f.content.code_names),
                              codebook_sizes=list(f.content.codebook_sizes))
        view = f.with_content(content)
        encoded = view.encode(events, content_row=np.arange(n))
        dense, kjt, _ = view.batch(encoded, torch.arange(n))
        return torch.sigmoid(self.model(dense, kjt)).numpy()

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
        if self.quantizer is not None:
            qdir = self.quantizer.save(directory / "quantizer")
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
        model = RankingModel(features.sparse_names, features.sparse_sizes,
                             features.dense_in_features, config)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise BundleError(f"{directory / 'ranker.safetensors'}: does not fit the model "
                              f"the manifest describes: {exc}") from exc
        quantizer = None
        if manifest["quantizer"] is not None:
            qdir = directory / manifest["quantizer"]
            kind = json.loads((qdir / "quantizer.json").read_text()).get("kind")
            classes = _quantizer_classes()
            if kind not in classes:
                raise BundleError(f"{qdir}: quantizer kind {kind!r} cannot be served "
                                  f"(choose from {sorted(classes)})")
            quantizer = classes[kind].load(qdir)
        return cls(model=model, features=features, config=config, quantizer=quantizer,
                   content_vectors=manifest["content_vectors"],
                   model_version=manifest["model_version"])
