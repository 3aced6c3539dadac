"""What every quantizer is: ``fit / encode / decode`` over (n, d) float32 matrices,
plus the helpers that turn codes into the item-codes contract."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import polars as pl

from mmdata.contracts import ItemEmbeddings, validate_embedding_matrix

SCALE_NAMES = ("s", "m", "l", "xl", "xxl")


@runtime_checkable
class Quantizer(Protocol):
    """The interface the ranker, the server and the benchmarks rely on.

    ``code_names[j]`` names column j of ``encode``'s output (``code_<scale>_<level>``),
    and ``codebook_sizes[j]`` bounds its values: ``0 <= codes[:, j] < codebook_sizes[j]``.
    """

    code_names: list[str]
    codebook_sizes: list[int]

    def fit(self, x: np.ndarray) -> "Quantizer":
        """x: (n, d) float32. Returns self."""

    def encode(self, x: np.ndarray) -> np.ndarray:
        """x: (n, d) float32 -> codes (n, n_codes) int64."""

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes: (n, n_codes) int64 -> reconstructions (n, d) float32."""


def total_bits(codebook_sizes: list[int]) -> float:
    return float(sum(np.log2(k) for k in codebook_sizes))


def check_input(x: np.ndarray, dim: int | None = None, *, what: str = "x") -> np.ndarray:
    """Boundary check for quantizer inputs: (n, d) float, finite, right width, non-empty."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected an (n, d) matrix, got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: empty input (0 rows)")
    x = validate_embedding_matrix(x, what, expected_dim=dim)
    # torch.from_numpy needs a writable buffer; arrays read from parquet may be read-only.
    return x if x.flags.writeable and x.flags.c_contiguous else np.array(x, order="C")


def check_codes(codes: np.ndarray, codebook_sizes: list[int]) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != len(codebook_sizes):
        raise ValueError(f"codes: expected shape (n, {len(codebook_sizes)}), got {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes: expected integers, got {codes.dtype}")
    sizes = np.asarray(codebook_sizes)
    if codes.size and ((codes < 0).any() or (codes >= sizes).any()):
        raise ValueError(f"codes: values out of range of codebook sizes {codebook_sizes}")
    return codes.astype(np.int64, copy=False)


def item_codes_frame(item_ids: np.ndarray, codes: np.ndarray, code_names: list[str]) -> pl.DataFrame:
    """The item-codes contract: item_id and one int64 column per code."""
    data = {"item_id": pl.Series(np.asarray(item_ids, dtype=np.int64))}
    for j, name in enumerate(code_names):
        data[name] = pl.Series(codes[:, j].astype(np.int64))
    return pl.DataFrame(data)


def encode_items(quantizer: Quantizer, embeddings: ItemEmbeddings) -> pl.DataFrame:
    """Encodes item embeddings into the item-codes contract frame."""
    codes = quantizer.encode(embeddings.vectors)
    return item_codes_frame(embeddings.item_ids, codes, quantizer.code_names)
