"""Fast CPU multi-scale residual encode on the precomputed tables.

Per chunk of rows: one matmul of the chunk against every code of every level (the
projection folded in), then level by level the gathered cross terms and an arg-min.
Chunks keep the (rows x codes) score block in the per-core cache; torch's matmul
uses every intra-op thread (``torch.set_num_threads``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.encode_tables import EncodeTables

# Rows per chunk: 1024 x 704 scores (the default 16/64/256 x 2 codebooks) is 2.9 MB
# of scores, about what two cores' L2 caches hold; measured flat from 1k to 4k rows.
CHUNK_ROWS = 2048


@torch.no_grad()
def cpu_multiscale_encode(x: torch.Tensor, tables: EncodeTables,
                          chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """x: (n, d) float32 -> (n, J) int64 codes; ties to the lowest code index."""
    if tables.project_first is not None:
        x = F.linear(x, *tables.project_first)  # (n, latent)
    n_levels = tables.n_levels
    codes = torch.empty(len(x), n_levels, dtype=torch.int64, device=x.device)
    cross = {(i, j): tables.cross_block(i, j)
             for j, (_, _, first) in enumerate(tables.level_rows) for i in range(first, j)}
    folded_t = tables.folded.T  # (d, K)
    for start in range(0, len(x), chunk_rows):
        xc = x[start:start + chunk_rows]
        # offset - 2 x.folded for every code of every level: (rows, K)
        scores = torch.addmm(tables.offset, xc, folded_t, alpha=-2.0)
        chosen = []
        for j, (row, size, first) in enumerate(tables.level_rows):
            level = scores[:, row:row + size]  # (rows, k_j) view
            for i in range(first, j):
                level.add_(cross[i, j].index_select(0, chosen[i]), alpha=2.0)
            chosen.append(level.argmin(1))
        codes[start:start + len(xc)] = torch.stack(chosen, 1)
    return codes
