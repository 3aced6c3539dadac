"""Fused multi-scale residual encode in Triton: every ID of every scale in one kernel.

Each program owns BLOCK_N rows and walks the levels in order. Per level it runs a
blocked matmul of its x tile against the level's folded codes (``tl.dot`` over BLOCK_D
slices of the input), adds the per-code offset and the cross terms of the codes its
chain already chose (gathered from the small cross tables), and keeps a running
(min, arg-min) per row in registers across the level's BLOCK_K code tiles. Chosen codes
stay in a (BLOCK_N, BLOCK_J) register tile; nothing of size (N x K) ever reaches memory
and the only write is the final (BLOCK_N, J) codes tile. See ``kernels/encode_tables.py``
for the algebra; the projection into the latent space is folded into the codes there.

Memory traffic: a program's x tile comes from HBM once; its re-reads, one per code tile
of every level, hit L1/L2, as do the tables (folded codes, offsets, cross blocks: 1.7 MB
for the default 16/64/256 x 2 levels at d = 384), which every program shares.

Not yet tuned on a GPU (none was at hand when this was written): one BLOCK_K serves
every level, so a 16-code level fills an eighth of a 128-wide tile; per-level block
sizes (a statically unrolled level loop) and autotuned BLOCK_N / num_warps are the
first things to try with ``benchmarks/encode.py --device cuda``.

Ties: within a tile ``tl.argmin`` returns the lowest index, across tiles a later tile
replaces the running best only when strictly smaller, so exact ties go to the lowest
code index, as in the reference.

Precision: ``tl.dot`` runs in full fp32 (``input_precision="ieee"``) by default, so codes
match the reference up to fp32 rounding at near-ties. "tf32x3" (three TF32 tensor-core
products, about fp32 accuracy) is the fast choice on an H100/H200; plain "tf32" (10-bit
mantissa) flips codes at near-ties far more often and is not offered.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.encode_tables import EncodeTables

PRECISIONS = ("ieee", "tf32x3")


@triton.jit
def _multiscale_encode_kernel(
    x_ptr, folded_ptr, offset_ptr, cross_ptr, levels_ptr, cross_start_ptr, codes_ptr,
    N, D,
    stride_xn, stride_xd, stride_fk, stride_fd, stride_cn, stride_cj,
    J: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_J: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_mask = rows < N
    level_cols = tl.arange(0, BLOCK_J)  # (BLOCK_J,)
    chosen = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.int32)
    for j in range(J):
        first_row = tl.load(levels_ptr + 3 * j)
        size = tl.load(levels_ptr + 3 * j + 1)
        chain_first = tl.load(levels_ptr + 3 * j + 2)
        best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
        best_idx = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for k0 in range(0, size, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,) code index within the level
            k_mask = ks < size
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_mask = ds < D
                xt = tl.load(x_ptr + rows[:, None] * stride_xn + ds[None, :] * stride_xd,
                             mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # (BN, BD)
                ft = tl.load(folded_ptr + (first_row + ks)[None, :] * stride_fk
                             + ds[:, None] * stride_fd,
                             mask=k_mask[None, :] & d_mask[:, None], other=0.0)  # (BD, BK)
                acc = tl.dot(xt, ft, acc, input_precision=PRECISION)
            offset = tl.load(offset_ptr + first_row + ks, mask=k_mask, other=0.0)
            score = offset[None, :] - 2.0 * acc  # (BN, BK)
            for i in range(chain_first, j):
                # code chosen at level i, per row (a masked row-sum picks column i)
                idx_i = tl.sum(tl.where(level_cols[None, :] == i, chosen, 0), axis=1)
                block = tl.load(cross_start_ptr + i * J + j)
                cross = tl.load(cross_ptr + block + idx_i[:, None] * size + ks[None, :],
                                mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                score += 2.0 * cross
            score = tl.where(k_mask[None, :], score, float("inf"))
            tile_best = tl.min(score, axis=1)
            tile_idx = tl.argmin(score, axis=1, tie_break_left=True).to(tl.int32) + k0
            better = tile_best < best  # strict: an earlier tile keeps an exact tie
            best = tl.where(better, tile_best, best)
            best_idx = tl.where(better, tile_idx, best_idx)
        chosen = tl.where(level_cols[None, :] == j, best_idx[:, None], chosen)
    tl.store(codes_ptr + rows[:, None] * stride_cn + level_cols[None, :] * stride_cj,
             chosen.to(tl.int64), mask=row_mask[:, None] & (level_cols[None, :] < J))


def triton_multiscale_encode(
    x: torch.Tensor,
    tables: EncodeTables,
    *,
    precision: str = "ieee",
    block_n: int = 64,
    block_k: int | None = None,
    block_d: int = 32,
) -> torch.Tensor:
    """x: (n, d) float32 -> (n, J) int64 codes through the fused kernel.

    Block sizes: BLOCK_K defaults to the largest codebook rounded up to a power of two,
    capped at 128 (a level's scores then sit in registers in one or two tiles); all
    blocks must be powers of two >= 16 (``tl.dot``'s minimum). Untuned on GPU so far.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if tables.project_first is not None:
        x = torch.nn.functional.linear(x, *tables.project_first)
    n, d = x.shape
    n_levels = tables.n_levels
    if block_k is None:
        largest = max(size for _, size, _ in tables.level_rows)
        block_k = min(128, max(16, triton.next_power_of_2(largest)))
    for name, block in (("block_n", block_n), ("block_k", block_k), ("block_d", block_d)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {block}")
    codes = torch.empty(n, n_levels, dtype=torch.int64, device=x.device)
    if n == 0:
        return codes
    folded = tables.folded
    grid = (triton.cdiv(n, block_n),)
    _multiscale_encode_kernel[grid](
        x, folded, tables.offset, tables.cross, tables.levels, tables.cross_start, codes,
        n, d,
        x.stride(0), x.stride(1), folded.stride(0), folded.stride(1),
        codes.stride(0), codes.stride(1),
        J=n_levels, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d,
        BLOCK_J=triton.next_power_of_2(n_levels), PRECISION=precision,
    )
    return codes
