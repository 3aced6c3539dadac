"""Fast CPU multi-scale residual encode on the precomputed tables.

Per chunk of rows: one matmul of the chunk against every code of every level (the
projection folded in), then per level one ``embedding_bag`` that sums the cross terms
of the codes the chain already chose, and an arg-min. That is 1 + 3 ops per level and
chunk, each over a whole (rows x k) block. On a busy machine every intra-op parallel
region waits for its slowest thread, so few large ops beat many small ones: on the
shared 2-core machine of benchmarks/README.md, an index_select + add_ per earlier level
(2j ops per level) and 2,048-row chunks ran at a median 0.25x faiss' items/s in
benchmarks/encode.py, this version at 1.2-1.5x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.encode_tables import EncodeTables

# Bytes of scores per chunk: 32 MiB is 11,915 rows of the default 704 codes (16/64/256 x 2
# levels); chunks bound memory for large codebooks and keep the op count low for small ones.
CHUNK_SCORE_BYTES = 32 << 20


@torch.no_grad()
def cpu_multiscale_encode(x: torch.Tensor, tables: EncodeTables,
                          chunk_rows: int | None = None) -> torch.Tensor:
    """x: (n, d) float32 -> (n, J) int64 codes; ties to the lowest code index."""
    if tables.project_first is not None:
        x = F.linear(x, *tables.project_first)  # (n, latent)
    n_codes = len(tables.offset)
    chunk_rows = chunk_rows or max(256, CHUNK_SCORE_BYTES // (4 * n_codes))
    codes = torch.empty(len(x), tables.n_levels, dtype=torch.int64, device=x.device)
    cross = []  # per level: None, or (stacked cross blocks (rows, k_j), row offsets (1, j'))
    for j in range(tables.n_levels):
        level = tables.level_cross(j)
        cross.append(None if level is None else
                     (level[0], torch.tensor([level[1]], dtype=torch.int64, device=x.device)))
    folded_t = tables.folded.T  # (d, K)
    for start in range(0, len(x), chunk_rows):
        xc = x[start:start + chunk_rows]
        chunk_codes = codes[start:start + len(xc)]  # (rows, J) view
        # offset - 2 x.folded for every code of every level: (rows, K)
        scores = torch.addmm(tables.offset, xc, folded_t, alpha=-2.0)
        for j, (row, size, first) in enumerate(tables.level_rows):
            level = scores[:, row:row + size]  # (rows, k_j) view
            if cross[j] is not None:
                table, offsets = cross[j]
                # sum over the chain's earlier levels i of cross_ij[code_i]: (rows, k_j)
                bag = F.embedding_bag(chunk_codes[:, first:j] + offsets, table, mode="sum")
                level.add_(bag, alpha=2.0)
            chunk_codes[:, j] = level.argmin(1)
    return codes
