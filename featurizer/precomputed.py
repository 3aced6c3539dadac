"""Pass-through for embeddings computed elsewhere (your own encoder, a feature store)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from featurizer.encoder import Encoder
from mmdata.contracts import DataContractError, ItemEmbeddings, read_embeddings


class PrecomputedEncoder(Encoder):
    """Looks item ids up in an item-embeddings file (parquet or ``.npy``).

    Its inputs are item ids, so it slots into :func:`featurizer.embed_items` beside
    text and image encoders; the stored vectors are used as they are (then
    normalised and combined like any other modality).
    """

    modality = "precomputed"

    def __init__(self, embeddings: ItemEmbeddings | str | Path) -> None:
        if not isinstance(embeddings, ItemEmbeddings):
            self.name = Path(embeddings).name
            embeddings = read_embeddings(embeddings)
        else:
            self.name = "precomputed"
        self.embeddings = embeddings
        self.dim = embeddings.dim
        order = np.argsort(embeddings.item_ids, kind="stable")
        self._sorted_ids = embeddings.item_ids[order]
        self._order = order

    def encode(self, inputs: Sequence[int]) -> np.ndarray:
        ids = np.asarray(inputs, dtype=np.int64)
        pos = np.searchsorted(self._sorted_ids, ids)
        pos = np.minimum(pos, len(self._sorted_ids) - 1)
        found = self._sorted_ids[pos] == ids if len(self._sorted_ids) else np.zeros(len(ids), bool)
        if not found.all():
            missing = ids[~found]
            raise DataContractError(
                f"{self.name}: no embedding for {len(missing)} item ids (first: {missing[:5].tolist()})"
            )
        return self.embeddings.vectors[self._order[pos]]
