"""Parity of the multi-scale encode op's kernels with the PyTorch reference.

Without a GPU the Triton kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``,
set in conftest.py before the kernel module is imported) on CPU tensors; with one, the
same tests run the compiled kernel on CUDA tensors. Sizes stay tiny: the interpreter
executes every program in numpy.
"""

import os

import pytest
import torch

from kernels import EncodeKernel, build_encode_tables, multiscale_encode
from kernels.encode_tables import should_fold
from kernels.pytorch.pt_multiscale_encode import pytorch_multiscale_encode

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
FAST = [EncodeKernel.CPU, EncodeKernel.TRITON] if HAS_CUDA or \
    os.environ.get("TRITON_INTERPRET") == "1" else [EncodeKernel.CPU]


def make_case(n, d, sizes, *, levels=2, latent=None, seed=0, device="cpu"):
    """Seeded inputs: x (n, d), codebooks[s][l] (k_s, latent) shrinking by level (as
    residual codebooks do), and a projection (latent, d) when latent is given."""
    g = torch.Generator().manual_seed(seed)
    width = latent or d
    x = torch.randn(n, d, generator=g)
    books = [[torch.randn(k, width, generator=g) * 0.5 ** level for level in range(levels)]
             for k in sizes]
    projection = None
    if latent is not None:
        projection = (torch.randn(latent, d, generator=g) / d ** 0.5,
                      0.1 * torch.randn(latent, generator=g))
    move = lambda t: t.to(device)  # noqa: E731
    books = [[move(b) for b in levels] for levels in books]
    projection = None if projection is None else tuple(move(t) for t in projection)
    return move(x), books, projection


def level_distances(x, books, projection, mode, codes, j):
    """(n, k_j) squared distances of level j's codes to the residual that the codes of
    the earlier levels of j's chain leave (reference arithmetic, float64)."""
    z = x.double() if projection is None else \
        torch.nn.functional.linear(x.double(), projection[0].double(), projection[1].double())
    flat = [(s, b.double()) for s, levels in enumerate(books) for b in levels]
    scale = flat[j][0]
    residual = z.clone()
    for i in range(j):
        if mode == "cascade" or flat[i][0] == scale:
            residual -= flat[i][1][codes[:, i]]
    return torch.cdist(residual, flat[j][1]).pow(2)


def assert_codes_match(ref, got, x, books, projection, mode, *, atol=1e-4):
    """Codes equal, except where a fast path's fp32 rounding picked the other side of a
    near-tie: there the two codes' distances (given the same earlier codes) must agree
    within atol, and such rows must be rare."""
    assert got.shape == ref.shape and got.dtype == torch.int64
    differ = (ref != got).any(1)
    assert differ.sum() <= 0.02 * len(ref), f"{int(differ.sum())} of {len(ref)} rows differ"
    for row in torch.nonzero(differ).flatten().tolist():
        j = int(torch.nonzero(ref[row] != got[row])[0])
        dist = level_distances(x[row:row + 1], books, projection, mode, ref[row:row + 1], j)[0]
        assert abs(dist[ref[row, j]] - dist[got[row, j]]) <= atol * (1 + dist.min()), \
            f"row {row} level {j}: {int(ref[row, j])} vs {int(got[row, j])} is no near-tie"


@pytest.mark.parametrize("kernel", FAST)
@pytest.mark.parametrize("mode", ["cascade", "parallel"])
@pytest.mark.parametrize("n", [0, 1, 37])
def test_matches_reference_without_projection(kernel, mode, n):
    # d = 20: not a multiple of any block; k = 5, 17, 70: no power of two, 70 > one K tile
    x, books, _ = make_case(n, 20, [5, 17, 70], seed=n, device=DEVICE)
    ref = pytorch_multiscale_encode(x, books, None, mode)
    got = multiscale_encode(x, books, mode=mode, kernel=kernel)
    assert got.shape == (n, 6)
    assert_codes_match(ref.cpu(), got.cpu(), x.cpu(), books, None, mode)


@pytest.mark.parametrize("kernel", FAST)
@pytest.mark.parametrize("mode", ["cascade", "parallel"])
@pytest.mark.parametrize("latent", [18, 3])
def test_matches_reference_with_projection(kernel, mode, latent):
    # latent 18 of d 20 folds the projection into the codes; latent 3 projects first
    x, books, proj = make_case(45, 20, [6, 33], latent=latent, seed=latent, device=DEVICE)
    assert should_fold(20, latent, 2 * (6 + 33)) == (latent == 18)
    ref = pytorch_multiscale_encode(x, books, proj, mode)
    got = multiscale_encode(x, books, projection=proj, mode=mode, kernel=kernel)
    cpu = lambda t: t.cpu()  # noqa: E731
    assert_codes_match(cpu(ref), cpu(got), cpu(x), [[cpu(b) for b in s] for s in books],
                       tuple(cpu(t) for t in proj), mode)


@pytest.mark.parametrize("kernel", FAST)
@pytest.mark.parametrize("sizes", [[3, 19, 40], [19]])
def test_single_level_scales_have_no_cross_terms(kernel, sizes):
    x, books, _ = make_case(21, 10, sizes, levels=1, seed=4, device=DEVICE)
    ref = pytorch_multiscale_encode(x, books, None, "parallel")
    got = multiscale_encode(x, books, mode="parallel", kernel=kernel)
    assert_codes_match(ref.cpu(), got.cpu(), x.cpu(), [[b.cpu() for b in s] for s in books],
                       None, "parallel")


def test_triton_with_small_blocks_and_many_tiles():
    """BLOCK 16 everywhere: several row blocks, K tiles and D slices, with masked tails."""
    if EncodeKernel.TRITON not in FAST:
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    from kernels.triton.triton_multiscale_encode import triton_multiscale_encode

    x, books, proj = make_case(53, 37, [7, 50], levels=3, latent=30, seed=5, device=DEVICE)
    tables = build_encode_tables(books, proj, "cascade")
    got = triton_multiscale_encode(x, tables, block_n=16, block_k=16, block_d=16)
    ref = pytorch_multiscale_encode(x, books, proj, "cascade")
    assert_codes_match(ref.cpu(), got.cpu(), x.cpu(), [[b.cpu() for b in s] for s in books],
                       tuple(t.cpu() for t in proj), "cascade")


def tied_case(device):
    """Level 0 has 40 codes with code 3 duplicated at 9 (same K tile) and at 21 (the next
    16-wide tile); level 1 has code 0 duplicated at 18 and 30. Rows sit next to code 3,
    so their level-0 distances to 3, 9 and 21 are exactly equal.

    Every value is a small dyadic rational (a multiple of 1/4, 1/64 or 1/1024), so every
    dot product and norm is exact in fp32 whatever the summation order: a BLAS (or the
    Triton interpreter's numpy matmul) may round a column differently by its position in
    a tile, which would break a tie that the values make exact."""
    g = torch.Generator().manual_seed(11)
    center = torch.randint(-8, 9, (40, 24), generator=g).float() / 4
    center[9] = center[3]
    center[21] = center[3]
    residual = torch.randint(-4, 5, (33, 24), generator=g).float() / 64
    residual[18] = residual[0]
    residual[30] = residual[0]
    x = center[3] + residual[0] + torch.randint(-1, 2, (25, 24), generator=g).float() / 1024
    return x.to(device), [[center.to(device), residual.to(device)]]


@pytest.mark.parametrize("kernel", [EncodeKernel.PYTORCH] + FAST)
def test_exact_ties_go_to_the_lowest_index(kernel):
    x, books = tied_case(DEVICE)
    codes = multiscale_encode(x, books, kernel=kernel).cpu()
    assert (codes[:, 0] == 3).all()
    # the level-1 residual is close to residual[0]; its copies at 18 and 30 never win
    assert (codes[:, 1] == 0).all()


def test_triton_ties_across_k_tiles():
    if EncodeKernel.TRITON not in FAST:
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    from kernels.triton.triton_multiscale_encode import triton_multiscale_encode

    x, books = tied_case(DEVICE)
    center = books[0][0].clone()
    center[3] += 1.0  # the tie is now between 9 (tile 0) and 21 (tile 1) only
    books = [[center, books[0][1]]]
    tables = build_encode_tables(books)
    codes = triton_multiscale_encode(x, tables, block_n=16, block_k=16, block_d=16).cpu()
    assert (codes[:, 0] == 9).all()


@pytest.mark.parametrize("kernel", [EncodeKernel.PYTORCH] + FAST)
def test_identical_codes_and_single_code_codebooks(kernel):
    x, books, _ = make_case(9, 8, [4], device=DEVICE)
    same = [[books[0][0][:1].expand(4, -1).contiguous(), books[0][1][:1].contiguous()]]
    codes = multiscale_encode(x, same, kernel=kernel).cpu()
    assert (codes == 0).all()


def test_reused_tables_give_the_same_codes():
    x, books, proj = make_case(30, 16, [8, 24], latent=16, seed=2)
    tables = build_encode_tables(books, proj, "parallel")
    once = multiscale_encode(x, books, projection=proj, mode="parallel", kernel=EncodeKernel.CPU)
    for kernel in FAST:
        again = multiscale_encode(x, books, projection=proj, mode="parallel", kernel=kernel,
                                  tables=tables)
        assert torch.equal(once, again)


def test_cpu_chunks_do_not_change_codes():
    from kernels.cpu.cpu_multiscale_encode import cpu_multiscale_encode

    x, books, proj = make_case(101, 16, [8, 24], latent=16, seed=3)
    tables = build_encode_tables(books, proj)
    assert torch.equal(cpu_multiscale_encode(x, tables, chunk_rows=7),
                       cpu_multiscale_encode(x, tables, chunk_rows=1000))


def test_boundary_errors():
    x, books, proj = make_case(4, 6, [3])
    with pytest.raises(ValueError, match="mode"):
        multiscale_encode(x, books, mode="serial")
    with pytest.raises(ValueError, match="float32"):
        multiscale_encode(x.double(), books)
    with pytest.raises(ValueError, match=r"codebook \(scale 0, level 1\)"):
        multiscale_encode(x, [[books[0][0], torch.zeros(3, 5)]])
    with pytest.raises(ValueError, match="projection weight"):
        multiscale_encode(x, books, projection=(torch.zeros(6, 5), None))
    with pytest.raises(ValueError, match="at least one scale"):
        multiscale_encode(x, [])
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="CUDA"):
            multiscale_encode(x, books, kernel=EncodeKernel.TRITON)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: compiled kernel at a real size, "
                                         "and the tf32x3 precision the interpreter ignores")
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_gpu_default_codebooks_match_reference(precision):
    from kernels.triton.triton_multiscale_encode import triton_multiscale_encode

    x, books, proj = make_case(20_000, 384, [16, 64, 256], latent=384, device="cuda")
    x = torch.nn.functional.normalize(x, dim=1)
    ref = pytorch_multiscale_encode(x, books, proj, "cascade")
    got = triton_multiscale_encode(x, build_encode_tables(books, proj), precision=precision)
    assert_codes_match(ref.cpu(), got.cpu(), x.cpu(), [[b.cpu() for b in s] for s in books],
                       tuple(t.cpu() for t in proj), "cascade", atol=1e-3)


def test_tables_layout():
    """Offsets, folded codes and the stacked cross blocks hold what the algebra says."""
    x, books, proj = make_case(3, 10, [4, 6], latent=10, seed=9)
    tables = build_encode_tables(books, proj, "cascade")
    flat = [b for levels in books for b in levels]
    weight, bias = proj
    assert tables.project_first is None  # 10 * 20 <= 10 * 30: folded
    torch.testing.assert_close(tables.folded[4:8], flat[1] @ weight)
    torch.testing.assert_close(tables.offset[:4], flat[0].pow(2).sum(1) - 2 * flat[0] @ bias)
    stacked, starts = tables.level_cross(3)  # level 3 sees levels 0, 1, 2
    assert starts == [0, 4, 8] and stacked.shape == (14, 6)
    torch.testing.assert_close(stacked[4:8], flat[1] @ flat[3].T)
    assert tables.level_cross(0) is None
    parallel = build_encode_tables(books, proj, "parallel")
    assert parallel.level_cross(2) is None  # first level of scale 1 starts its own chain
    torch.testing.assert_close(parallel.level_cross(3)[0], flat[2] @ flat[3].T)


def test_triton_wrapper_rejects_bad_settings():
    from kernels.triton.triton_multiscale_encode import triton_multiscale_encode

    x, books, _ = make_case(4, 8, [4])
    tables = build_encode_tables(books)
    with pytest.raises(ValueError, match="precision"):
        triton_multiscale_encode(x, tables, precision="tf32")
    with pytest.raises(ValueError, match="block_k"):
        triton_multiscale_encode(x, tables, block_k=24)
