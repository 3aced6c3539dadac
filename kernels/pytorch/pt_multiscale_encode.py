"""Reference multi-scale residual encode: the definition every fast path is checked against.

Plain torch, level by level, with the residual kept explicitly; nothing is fused or
precomputed, so it reads as the algorithm itself.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def pytorch_multiscale_encode(
    x: torch.Tensor,
    codebooks: Sequence[Sequence[torch.Tensor]],
    projection: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    mode: str = "cascade",
) -> torch.Tensor:
    """Greedy codes of every scale and level.

    Args:
        x: (n, d) float32 embeddings.
        codebooks: ``codebooks[s][l]`` is scale s, level l: (k_s, latent).
        projection: ``(weight, bias)`` of the linear map into the latent space,
            weight (latent, d), bias (latent,) or None; None: the latent is x.
        mode: "cascade" (scale s quantizes what scales < s left over: one residual
            chain through every level) or "parallel" (each scale starts from the latent).

    Returns:
        (n, J) int64 codes, J = total number of levels, scale-major. At every level the
        code minimises ||r - c||^2; exact ties go to the lowest code index.
    """
    z = x if projection is None else F.linear(x, projection[0], projection[1])  # (n, latent)
    codes = []
    residual = z
    for s, levels in enumerate(codebooks):
        if mode == "parallel" or s == 0:
            residual = z
        for book in levels:  # (k, latent)
            # ||r - c||^2 = ||r||^2 + ||c||^2 - 2 r.c; ||r||^2 does not change the arg-min.
            dist = book.pow(2).sum(1)[None, :] - 2.0 * (residual @ book.T)  # (n, k)
            idx = dist.argmin(1)  # first minimum: lowest index on ties
            residual = residual - book[idx]
            codes.append(idx)
    return torch.stack(codes, 1)
