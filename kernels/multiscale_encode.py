"""Multi-scale residual encode: embeddings -> every ID of every scale and level, greedily.

The public op. ``multiscale_encode`` picks a kernel:

* ``EncodeKernel.PYTORCH``: the reference (``kernels/pytorch``), explicit residuals.
* ``EncodeKernel.TRITON``: the fused kernel (``kernels/triton``); CUDA tensors, or CPU
  tensors under ``TRITON_INTERPRET=1`` (tests only: the interpreter is slow).
* ``EncodeKernel.CPU``: the fast CPU path (``kernels/cpu``), one matmul per chunk of rows
  over all codes with the projection folded in. It beats faiss' ``ResidualQuantizer``
  (beam 1, the same codebooks) on CPU, so faiss is never picked: see
  ``benchmarks/encode.py`` and ``benchmarks/README.md``.

Default: TRITON for CUDA tensors, CPU otherwise. Greedy search (beam 1) is the op's
contract; a beam > 1 is served by the torch beam search in
``quantizer.mmdict.MultiScaleResidualQuantizer.search_codes``.

The fast paths run on ``EncodeTables`` (``kernels/encode_tables.py``); build them once
with ``build_encode_tables`` and pass them as ``tables=`` when encoding many small
batches with the same codebooks (an online server), otherwise each call builds them.
"""

from __future__ import annotations

import enum
import os
from typing import Sequence

import torch

from kernels.encode_tables import EncodeTables, build_encode_tables

MODES = ("cascade", "parallel")


class EncodeKernel(enum.Enum):
    PYTORCH = "pytorch"
    TRITON = "triton"
    CPU = "cpu"


def default_kernel(x: torch.Tensor) -> EncodeKernel:
    return EncodeKernel.TRITON if x.is_cuda else EncodeKernel.CPU


def validate_multiscale_encode_inputs(
    x: torch.Tensor,
    codebooks: Sequence[Sequence[torch.Tensor]],
    projection: tuple[torch.Tensor, torch.Tensor | None] | None,
    mode: str,
) -> None:
    """Shape, dtype and device checks at the op's boundary (no pass over the data)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if x.ndim != 2 or x.dtype != torch.float32:
        raise ValueError(f"x: expected an (n, d) float32 tensor, got {tuple(x.shape)} {x.dtype}")
    if not codebooks or any(len(levels) == 0 for levels in codebooks):
        raise ValueError("codebooks: expected at least one scale, each with at least one level")
    latent = x.shape[1]
    if projection is not None:
        weight, bias = projection
        if weight.ndim != 2 or weight.shape[1] != x.shape[1]:
            raise ValueError(f"projection weight: expected (latent, {x.shape[1]}), "
                             f"got {tuple(weight.shape)}")
        latent = weight.shape[0]
        if bias is not None and tuple(bias.shape) != (latent,):
            raise ValueError(f"projection bias: expected ({latent},), got {tuple(bias.shape)}")
    for s, levels in enumerate(codebooks):
        for level, book in enumerate(levels):
            if book.ndim != 2 or book.shape[1] != latent or book.shape[0] < 1:
                raise ValueError(f"codebook (scale {s}, level {level}): expected (k >= 1, "
                                 f"{latent}), got {tuple(book.shape)}")
            if book.device != x.device:
                raise ValueError(f"codebook (scale {s}, level {level}) is on {book.device}, "
                                 f"x on {x.device}")


def multiscale_encode(
    x: torch.Tensor,
    codebooks: Sequence[Sequence[torch.Tensor]],
    *,
    projection: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    mode: str = "cascade",
    kernel: EncodeKernel | None = None,
    tables: EncodeTables | None = None,
) -> torch.Tensor:
    """Greedy residual codes of every scale and level.

    Args:
        x: (n, d) float32 embeddings.
        codebooks: ``codebooks[s][l]`` (k_s, latent): scale s, level l (center, residuals).
        projection: ``(weight (latent, d), bias (latent,) or None)``, the linear encoder
            applied before the codebooks, or None (latent = x).
        mode: "cascade" (one residual chain through all scales) or "parallel" (each
            scale quantizes the latent on its own).
        kernel: which implementation; None picks the fastest for x's device.
        tables: ``build_encode_tables(codebooks, projection, mode)``, reused across calls.

    Returns:
        (n, J) int64 codes, J = total levels, scale-major (s0l0, s0l1, s1l0, ...); at
        each level the code nearest (squared L2) to the residual, exact ties to the
        lowest index.

    Example::

        books = [[torch.randn(16, 8), torch.randn(16, 8)], [torch.randn(64, 8)] * 2]
        codes = multiscale_encode(torch.randn(100, 8), books)   # (100, 4) int64
    """
    validate_multiscale_encode_inputs(x, codebooks, projection, mode)
    kernel = kernel or default_kernel(x)
    if kernel is EncodeKernel.PYTORCH:
        from kernels.pytorch.pt_multiscale_encode import pytorch_multiscale_encode

        with torch.no_grad():
            return pytorch_multiscale_encode(x, codebooks, projection, mode)
    if tables is None:
        tables = build_encode_tables(codebooks, projection, mode)
    if kernel is EncodeKernel.CPU:
        from kernels.cpu.cpu_multiscale_encode import cpu_multiscale_encode

        return cpu_multiscale_encode(x, tables)
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "").lower() not in ("1", "true", "on"):
        raise RuntimeError("EncodeKernel.TRITON needs CUDA tensors (or TRITON_INTERPRET=1 "
                           "for CPU tensors, tests only)")
    from kernels.triton.triton_multiscale_encode import triton_multiscale_encode

    return triton_multiscale_encode(x.contiguous(), tables)
