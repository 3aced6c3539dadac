"""What every quantizer is: ``fit / encode / decode`` over (n, d) float32 matrices and
``save / load`` without pickle, plus the helpers that turn codes into the item-codes contract."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np
import polars as pl

from mmdata.contracts import ItemEmbeddings, validate_embedding_matrix

SCALE_NAMES = ("s", "m", "l", "xl", "xxl")


@runtime_checkable
class Quantizer(Protocol):
    """The interface the ranker, the server and the benchmarks rely on; every class in
    ``quantizer.registry.QUANTIZERS`` implements it.

    ``code_names[j]`` names column j of ``encode``'s output (``code_<scale>_<level>``),
    and ``codebook_sizes[j]`` bounds its values: ``0 <= codes[:, j] < codebook_sizes[j]``.
    ``kind`` names the class in ``quantizer.json``, so ``load_quantizer`` can dispatch.

    Example::

        q = build_quantizer("mmdict", seed=0).fit(x)   # x: (n, d) float32
        codes = q.encode(x)                             # (n, len(q.code_names)) int64
        q2 = load_quantizer(save_quantizer(q, "run/quantizer"))
        assert (q2.encode(x) == codes).all()
    """

    kind: ClassVar[str]
    dim: int | None  # input width; None before fit
    code_names: list[str]
    codebook_sizes: list[int]

    def fit(self, x: np.ndarray, *, progress: bool = False) -> "Quantizer":
        """x: (n, d) float32. ``progress`` shows a bar where fitting is slow. Returns self."""

    def encode(self, x: np.ndarray, *, validate: bool = True) -> np.ndarray:
        """x: (n, d) float32 -> codes (n, n_codes) int64. ``validate=False`` skips the
        input check, for callers that checked ``x`` at their boundary."""

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes: (n, n_codes) int64 -> reconstructions (n, d) float32."""

    def save(self, directory: str | Path) -> Path:
        """Writes ``quantizer.json`` and safetensors (no pickle); returns ``directory``."""

    @classmethod
    def load(cls, directory: str | Path) -> "Quantizer":
        """The quantizer ``save`` wrote to ``directory``."""


def scale_code_layout(scale_sizes: list[int], levels: int) -> tuple[list[str], list[int]]:
    """Checks a (scales x levels) layout; returns the code column names and sizes.

    Example: ``scale_code_layout([16, 64], 2)`` ->
    ``(["code_s_0", "code_s_1", "code_m_0", "code_m_1"], [16, 16, 64, 64])``.
    """
    if not scale_sizes or len(scale_sizes) > len(SCALE_NAMES):
        raise ValueError(f"scale_sizes: 1..{len(SCALE_NAMES)} scales, got {scale_sizes}")
    if any(k < 2 for k in scale_sizes) or levels < 1:
        raise ValueError(f"codebook sizes must be >= 2 and levels >= 1, got "
                         f"{scale_sizes} x {levels}")
    names = [f"code_{SCALE_NAMES[s]}_{lvl}" for s in range(len(scale_sizes)) for lvl in range(levels)]
    sizes = [k for k in scale_sizes for _ in range(levels)]
    return names, sizes


def write_quantizer_meta(directory: str | Path, meta: dict) -> Path:
    """Creates ``directory`` and writes ``quantizer.json`` (kind, dim, config, ...)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "quantizer.json").write_text(json.dumps(meta, indent=2))
    return directory


def read_quantizer_meta(directory: str | Path, kind: str | None = None) -> dict:
    """Reads ``quantizer.json``; given ``kind``, refuses a directory that holds another."""
    path = Path(directory) / "quantizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no quantizer.json - not a saved quantizer")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{directory}: holds a {meta.get('kind')!r} quantizer, not {kind!r}")
    return meta


@contextlib.contextmanager
def single_threaded():
    """faiss' trainers and torch's reductions (a mean, an SVD) sum over threads, so what
    they compute, and every code after it, would depend on the machine's thread count;
    inside this block both run on one thread, so a fit gives the same codes anywhere."""
    import faiss
    import torch

    faiss_threads, torch_threads = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(faiss_threads)
        torch.set_num_threads(torch_threads)


def fit_record(x: np.ndarray) -> dict:
    """What a fit saw, for ``quantizer.json``: the input's shape and SHA-256 and the
    versions of the libraries that computed it (IDs are trained rows' keys downstream:
    a refit on other data or libraries must be recognisable)."""
    from importlib.metadata import PackageNotFoundError, version

    x = np.ascontiguousarray(x, dtype=np.float32)
    versions = {}
    for package in ("torch", "faiss-cpu", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return {"rows": int(x.shape[0]), "dim": int(x.shape[1]),
            "input_sha256": hashlib.sha256(x.tobytes()).hexdigest(), "versions": versions}


def total_bits(codebook_sizes: list[int]) -> float:
    return float(sum(np.log2(k) for k in codebook_sizes))


def check_input(x: np.ndarray, dim: int | None = None, *, what: str = "x") -> np.ndarray:
    """Boundary check for quantizer inputs: (n, d) float, finite, right width, non-empty."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected an (n, d) matrix, got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: empty input (0 rows)")
    return as_rows(validate_embedding_matrix(x, what, expected_dim=dim))


def as_rows(x: np.ndarray) -> np.ndarray:
    """(n, d) float32, writable and C-contiguous, copied only when it is not: what
    ``encode(..., validate=False)`` does instead of ``check_input``."""
    x = np.asarray(x, dtype=np.float32)
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
