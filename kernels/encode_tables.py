"""Tables that turn a residual nearest-code search into one matmul plus small gathers.

For level j of a residual chain, let z = W x + b be the latent (z = x without a
projection) and c_i the codes chosen at the chain's earlier levels i < j, so the residual
is r_j = z - sum_i c_i. For any code c of level j

    ||r_j - c||^2 = ||r_j||^2 + (||c||^2 - 2 b.c) - 2 x.(W^T c) + 2 sum_{i<j} c_i.c

The first term is the same for every c, so the arg-min needs

* ``offset[c] = ||c||^2 - 2 b.c``                (one float per code),
* ``folded[c] = W^T c``                          (the code seen from the input space),
* ``cross_ij[a, c] = c_a.c``, i < j in one chain (small: k_i x k_j floats).

So ``x @ folded.T`` over all codes of all levels is ONE matmul, the residual is never
formed, and the projection costs nothing at encode time: it is folded into the codes.
This is faiss' ``use_beam_LUT`` idea, extended with the projection; the fused Triton
kernel and the fast CPU path both run on these tables.

Folding pays when ``d * K <= latent * (d + K)`` (K = total codes, d = input width);
otherwise (a latent much narrower than the input) ``project_first`` is set and the fast
paths apply the projection before the matmul, with tables built in the latent space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class EncodeTables:
    # (K, d_in) codes as seen from the matmul's input: W^T c folded, or c itself.
    folded: torch.Tensor
    # (K,) float32: ||c||^2 - 2 b.c (or ||c||^2 when there is no folded bias).
    offset: torch.Tensor
    # (n_cross,) float32: the blocks cross_ij (k_i, k_j), row-major, packed level by level
    # (j outer, i inner), so one level's blocks form a (sum_i k_i, k_j) matrix; a single
    # unused zero when no level has an earlier level in its chain.
    cross: torch.Tensor
    # (J, 3) int32 per level: first row in `folded`, codebook size, first level of its chain.
    levels: torch.Tensor
    # (J, J) int64: start of block cross_ij in `cross` (-1 where i, j share no chain or i >= j).
    cross_start: torch.Tensor
    # (weight, bias) to apply to x before the matmul, or None when folded (or absent).
    project_first: tuple[torch.Tensor, torch.Tensor | None] | None
    # Host copies of `levels` and `cross_start` (for loops that run on the host).
    level_rows: tuple[tuple[int, int, int], ...]
    cross_starts: dict[tuple[int, int], int]

    @property
    def n_levels(self) -> int:
        return len(self.level_rows)

    def level_cross(self, j: int) -> tuple[torch.Tensor, list[int]] | None:
        """Every cross block of level j stacked: a (sum_i k_i, k_j) view (the blocks of one
        level are packed one after another, so the stack is contiguous), and the row where
        each earlier level i of the chain starts. None for the first level of a chain."""
        first, k_j = self.level_rows[j][2], self.level_rows[j][1]
        if first == j:
            return None
        starts = [0]
        for i in range(first, j - 1):
            starts.append(starts[-1] + self.level_rows[i][1])
        rows = starts[-1] + self.level_rows[j - 1][1]
        begin = self.cross_starts[first, j]
        return self.cross[begin:begin + rows * k_j].view(rows, k_j), starts


def should_fold(d_in: int, latent: int, n_codes: int) -> bool:
    """True when x @ (W^T C^T) costs no more than (x @ W^T) @ C^T."""
    return d_in * n_codes <= latent * (d_in + n_codes)


@torch.no_grad()
def build_encode_tables(
    codebooks: Sequence[Sequence[torch.Tensor]],
    projection: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    mode: str = "cascade",
) -> EncodeTables:
    """Precomputes the tables once per set of codebooks (cheap next to encoding many rows:
    O(K * latent * d) for the fold, O(sum k_i k_j latent) for the cross blocks).

    Args: as ``kernels.multiscale_encode``: ``codebooks[s][l]`` (k_s, latent);
        ``projection`` (weight (latent, d), bias (latent,) or None) or None; mode.
    """
    books = [book.detach().float() for levels in codebooks for book in levels]
    chain_start, j = [], 0
    for s, levels in enumerate(codebooks):
        first = 0 if mode == "cascade" else j
        chain_start += [first] * len(levels)
        j += len(levels)
    all_codes = torch.cat(books)  # (K, latent)
    offset = all_codes.pow(2).sum(1)
    folded, project_first = all_codes, None
    if projection is not None:
        weight, bias = projection[0].detach().float(), projection[1]
        if should_fold(weight.shape[1], weight.shape[0], len(all_codes)):
            folded = all_codes @ weight  # (K, d): row c is W^T c
            if bias is not None:
                offset = offset - 2.0 * (all_codes @ bias.detach().float())
        else:
            project_first = (weight, None if bias is None else bias.detach().float())
    n_levels = len(books)
    cross_start = torch.full((n_levels, n_levels), -1, dtype=torch.int64)
    starts: dict[tuple[int, int], int] = {}
    blocks, pos = [], 0
    for j in range(n_levels):
        for i in range(chain_start[j], j):
            blocks.append((books[i] @ books[j].T).reshape(-1))  # (k_i * k_j,)
            cross_start[i, j] = starts[i, j] = pos
            pos += blocks[-1].numel()
    device = all_codes.device
    # never empty: a kernel launch wants a real pointer even when no level reads it
    cross = torch.cat(blocks) if blocks else torch.zeros(1, device=device)
    rows, first_row = [], 0
    for j, book in enumerate(books):
        rows.append((first_row, len(book), chain_start[j]))
        first_row += len(book)
    return EncodeTables(
        folded=folded.contiguous(), offset=offset.contiguous(), cross=cross.contiguous(),
        levels=torch.tensor(rows, dtype=torch.int32, device=device),
        cross_start=cross_start.to(device), project_first=project_first,
        level_rows=tuple(rows), cross_starts=starts)
