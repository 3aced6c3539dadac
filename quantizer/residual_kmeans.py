"""A plain multi-scale residual k-means quantizer (RQ-KMeans, as in Kuaishou's QARM).

Each scale quantizes the same embedding independently with ``levels`` greedy steps:
level 0 assigns the nearest centre, level l assigns the nearest code of the residual
left by levels < l. Codebooks are fitted with faiss k-means, level by level. It has no
learned encoder: it is the baseline the learned MmDict quantizer must beat.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from kernels import build_encode_tables, multiscale_encode
from quantizer.base import (SCALE_NAMES, as_rows, check_codes, check_input, fit_record,
                            read_quantizer_meta, scale_code_layout, single_threaded,
                            write_quantizer_meta)


@dataclass
class ResidualKMeansConfig:
    # Codebook size per scale, coarse to fine; every scale has `levels` levels.
    scale_sizes: list[int] = field(default_factory=lambda: [16, 64, 256])
    # Residual levels per scale: 2 = a center code, then a residual code.
    levels: int = 2
    kmeans_iters: int = 25
    seed: int = 0
    # Rows encoded per batch (bounds memory at batch x max codebook size floats).
    batch_size: int = 65_536

    def __post_init__(self) -> None:
        scale_code_layout(self.scale_sizes, self.levels)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code (squared L2), ties to the lowest index.

    Args: x: (n, d); codebook: (k, d). Returns: (n,) int64.
    """
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is the same for every code.
    scores = codebook.pow(2).sum(1)[None, :] - 2.0 * (x @ codebook.T)  # (n, k)
    return scores.argmin(1)


class ResidualKMeansQuantizer:
    """Multi-scale residual k-means: ``len(scale_sizes) x levels`` codes per item.

    Example::

        rq = ResidualKMeansQuantizer(ResidualKMeansConfig(scale_sizes=[16, 64, 256]))
        codes = rq.fit(x).encode(x)        # (n, 6) int64: code_s_0, code_s_1, code_m_0, ...
        x_hat = rq.decode(codes)           # (n, d), the finest scale's reconstruction
    """

    kind = "residual_kmeans"

    def __init__(self, config: ResidualKMeansConfig | None = None) -> None:
        self.config = config or ResidualKMeansConfig()
        cfg = self.config
        self.code_names, self.codebook_sizes = scale_code_layout(cfg.scale_sizes, cfg.levels)
        self.codebooks: list[np.ndarray] = []  # one (k, d) per code column
        self.dim: int | None = None
        # What the fit saw (quantizer.base.fit_record), saved in quantizer.json.
        self.fit_info: dict | None = None
        self._tables: tuple[tuple[int, ...], object] | None = None  # (codebook ids, tables)

    def fit(self, x: np.ndarray, *, progress: bool = False) -> "ResidualKMeansQuantizer":
        """x: (n, d) float32. ``progress`` is accepted for interface parity (k-means is fast)."""
        x = check_input(x)
        cfg = self.config
        self.dim = x.shape[1]
        self.fit_info = fit_record(x)
        self.codebooks = []
        with single_threaded():  # the same codebooks, and codes, on any thread count
            self._fit_scales(x)
        return self

    def _fit_scales(self, x: np.ndarray) -> None:
        import faiss

        cfg = self.config
        for s, k in enumerate(cfg.scale_sizes):
            residual = x.copy()
            for level in range(cfg.levels):
                if len(residual) < k:
                    raise ValueError(
                        f"scale {SCALE_NAMES[s]}: codebook of {k} codes needs at least {k} "
                        f"training rows, got {len(residual)}"
                    )
                km = faiss.Kmeans(self.dim, k, niter=cfg.kmeans_iters,
                                  seed=cfg.seed + 1000 * s + level, verbose=False,
                                  min_points_per_centroid=1)
                km.train(np.ascontiguousarray(residual))
                codebook = km.centroids.astype(np.float32)
                idx = nearest_code(torch.from_numpy(residual), torch.from_numpy(codebook)).numpy()
                residual -= codebook[idx]
                self.codebooks.append(codebook)

    def _check_fitted(self) -> None:
        if not self.codebooks:
            raise RuntimeError("quantizer is not fitted: call fit(x) or load(dir) first")

    def encode(self, x: np.ndarray, *, validate: bool = True) -> np.ndarray:
        """x: (n, d) float32 -> (n, J) int64 through ``kernels.multiscale_encode``
        (parallel scales; the Triton kernel on a GPU, the fast CPU path otherwise).
        ``validate=False`` trusts a caller that checked ``x`` at its boundary."""
        self._check_fitted()
        x = check_input(x, self.dim) if validate else as_rows(x)
        cfg = self.config
        codes = np.empty((len(x), len(self.codebooks)), dtype=np.int64)
        books = [[torch.from_numpy(self.codebooks[s * cfg.levels + level])
                  for level in range(cfg.levels)] for s in range(len(cfg.scale_sizes))]
        key = tuple(id(book) for book in self.codebooks)  # fit and load make new arrays
        if self._tables is None or self._tables[0] != key:  # built once, not per request
            self._tables = (key, build_encode_tables(books, mode="parallel"))
        tables = self._tables[1]
        for start in range(0, len(x), cfg.batch_size):
            xb = torch.from_numpy(x[start:start + cfg.batch_size])
            codes[start:start + len(xb)] = multiscale_encode(
                xb, books, mode="parallel", tables=tables).numpy()
        return codes

    def decode(self, codes: np.ndarray, *, scale: int = -1) -> np.ndarray:
        """Sum of the codewords of one scale (the finest by default)."""
        self._check_fitted()
        codes = check_codes(codes, self.codebook_sizes)
        levels = self.config.levels
        s = scale % len(self.config.scale_sizes)
        out = np.zeros((len(codes), self.dim), dtype=np.float32)
        for level in range(levels):
            j = s * levels + level
            out += self.codebooks[j][codes[:, j]]
        return out

    def save(self, directory: str | Path) -> Path:
        self._check_fitted()
        directory = write_quantizer_meta(
            directory, {"kind": self.kind, "dim": self.dim, "config": asdict(self.config),
                        "fit": self.fit_info})
        save_file({f"codebook_{j}": c for j, c in enumerate(self.codebooks)},
                  str(directory / "codebooks.safetensors"))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "ResidualKMeansQuantizer":
        meta = read_quantizer_meta(directory, cls.kind)
        quantizer = cls(ResidualKMeansConfig(**meta["config"]))
        tensors = load_file(str(Path(directory) / "codebooks.safetensors"))
        quantizer.codebooks = [tensors[f"codebook_{j}"] for j in range(len(quantizer.codebook_sizes))]
        quantizer.dim = int(meta["dim"])
        quantizer.fit_info = meta.get("fit")
        return quantizer
