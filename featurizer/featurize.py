"""Turn an items table into one content vector per item (the item-embeddings contract).

**The combination rule.** Each encoder reads one column: text encoders ``text``,
image encoders ``image_path``, a :class:`PrecomputedEncoder` ``item_id``. For every
item, each modality's vector is L2-normalised, weighted by ``1/sqrt(m)`` where ``m``
is how many of the item's modalities are present, and the weighted vectors are
concatenated in encoder order; a missing modality contributes zeros. So every output
vector has unit norm and one width (the sum of the encoders' widths), cosine
similarity between two items with both modalities is the mean of the per-modality
cosines, and an item with text only is still comparable with one that has both.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from featurizer.encoder import Encoder
from mmdata.contracts import DataContractError, ItemEmbeddings

COLUMN_OF_MODALITY = {"text": "text", "image": "image_path", "precomputed": "item_id"}


def _present(items: pl.DataFrame, column: str) -> np.ndarray:
    if column not in items.columns:
        return np.zeros(items.height, dtype=bool)
    values = items[column]
    present = values.is_not_null()
    if values.dtype == pl.String:
        present = present & (values.str.strip_chars().str.len_chars() > 0)
    return present.to_numpy()


def embed_items(
    items: pl.DataFrame,
    encoders: Sequence[Encoder],
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> ItemEmbeddings:
    """Encodes every item with every encoder and combines them (see module doc).

    Args:
        items: frame following the items contract.
        encoders: one or more encoders; each reads the column of its modality.
        batch_size: items per encoder call.
        progress: show a progress bar per encoder.

    Returns:
        ItemEmbeddings with ``item_ids`` in the items' order and (n, sum(dims)) vectors.

    Example::

        emb = embed_items(items, [minilm_text_encoder(), EfficientNetLite0Encoder()])
        emb.vectors.shape  # (n_items, 384 + 1280)
    """
    if not encoders:
        raise ValueError("embed_items needs at least one encoder")
    n = items.height
    present = []
    for encoder in encoders:
        column = COLUMN_OF_MODALITY.get(encoder.modality)
        if column is None:
            raise ValueError(f"{encoder!r}: unknown modality {encoder.modality!r}")
        if column not in items.columns:
            raise DataContractError(
                f"items have no column '{column}', which {encoder.name} ({encoder.modality}) reads"
            )
        present.append(_present(items, column))
    present_mat = np.stack(present, axis=1)  # (n, E)
    counts = present_mat.sum(1)
    if n and (counts == 0).any():
        empty = items["item_id"].to_numpy()[counts == 0]
        raise DataContractError(
            f"{len(empty)} items have no content for any encoder (first item_id: {empty[:5].tolist()})"
        )
    weights = present_mat / np.sqrt(np.maximum(counts, 1))[:, None]  # (n, E)

    widths = [e.dim for e in encoders]
    out = np.zeros((n, sum(widths)), dtype=np.float32)
    offset = 0
    for k, encoder in enumerate(encoders):
        rows = np.flatnonzero(present_mat[:, k])
        values = items[COLUMN_OF_MODALITY[encoder.modality]].to_list()
        bar = tqdm(total=len(rows), desc=f"encode {encoder.modality} ({encoder.name})",
                   unit="item", disable=not progress)
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            vectors = np.asarray(encoder.encode([values[i] for i in batch]), dtype=np.float32)
            if vectors.shape != (len(batch), encoder.dim):
                raise ValueError(
                    f"{encoder!r} returned shape {vectors.shape}, expected {(len(batch), encoder.dim)}"
                )
            if not np.isfinite(vectors).all():
                raise ValueError(f"{encoder!r} returned NaN/Inf for items {batch[:5].tolist()}")
            norms = np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            out[batch, offset:offset + encoder.dim] = vectors / norms * weights[batch, k:k + 1]
            bar.update(len(batch))
        bar.close()
        offset += encoder.dim
    return ItemEmbeddings(items["item_id"].cast(pl.Int64).to_numpy(), out)
