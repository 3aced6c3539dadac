import numpy as np
import pytest

from mmdata import ItemEmbeddings, validate_codes
from quantizer import (ResidualKMeansConfig, ResidualKMeansQuantizer, encode_items,
                       quantizer_metrics)
from quantizer.metrics import collision_rate, kendall_tau, recall_at_k, rel_mse, utilization


def test_codes_follow_the_contract(clustered_embeddings):
    q = ResidualKMeansQuantizer(ResidualKMeansConfig(scale_sizes=[8, 32], seed=0))
    q.fit(clustered_embeddings)
    assert q.code_names == ["code_s_0", "code_s_1", "code_m_0", "code_m_1"]
    frame = encode_items(q, ItemEmbeddings(np.arange(100, 3100), clustered_embeddings))
    validate_codes(frame)
    codes = frame.select(q.code_names).to_numpy()
    assert (codes.max(0) < np.array(q.codebook_sizes)).all()


def test_residual_levels_and_finer_scales_reconstruct_better(clustered_embeddings):
    x = clustered_embeddings
    q = ResidualKMeansQuantizer(ResidualKMeansConfig(scale_sizes=[8, 64], seed=0)).fit(x)
    codes = q.encode(x)
    coarse, fine = rel_mse(x, q.decode(codes, scale=0)), rel_mse(x, q.decode(codes, scale=1))
    center_only = rel_mse(x, q.codebooks[2][codes[:, 2]])
    assert fine < center_only < 1.0
    assert fine < coarse


def test_beats_shuffled_codes_on_every_metric(clustered_embeddings):
    x = clustered_embeddings
    q = ResidualKMeansQuantizer(ResidualKMeansConfig(scale_sizes=[16, 64], seed=0)).fit(x)
    codes = q.encode(x)
    shuffled = np.random.default_rng(0).permutation(codes)
    good = quantizer_metrics(x, codes, q.decode(codes), q.codebook_sizes)
    bad = quantizer_metrics(x, shuffled, q.decode(shuffled), q.codebook_sizes)
    assert good["rel_mse"] < 0.3 < bad["rel_mse"]
    assert good["recall_at_10"] > bad["recall_at_10"] + 0.15
    assert good["kendall_tau"] > 0.6 > bad["kendall_tau"] + 0.3
    assert good["utilization"] == 1.0


def test_deterministic_and_save_load_identity(tmp_path, clustered_embeddings):
    x = clustered_embeddings
    cfg = ResidualKMeansConfig(scale_sizes=[8, 16], seed=3)
    a = ResidualKMeansQuantizer(cfg).fit(x)
    b = ResidualKMeansQuantizer(cfg).fit(x)
    assert np.array_equal(a.encode(x), b.encode(x))
    a.save(tmp_path / "q")
    c = ResidualKMeansQuantizer.load(tmp_path / "q")
    assert np.array_equal(a.encode(x), c.encode(x))
    assert np.array_equal(a.decode(a.encode(x)), c.decode(c.encode(x)))
    assert {p.name for p in (tmp_path / "q").iterdir()} == {"codebooks.safetensors", "quantizer.json"}


def test_batched_encode_equals_one_batch(clustered_embeddings):
    x = clustered_embeddings
    one = ResidualKMeansQuantizer(ResidualKMeansConfig(scale_sizes=[8, 16], batch_size=10**6))
    small = ResidualKMeansQuantizer(ResidualKMeansConfig(scale_sizes=[8, 16], batch_size=77))
    one.fit(x)
    small.codebooks, small.dim = one.codebooks, one.dim
    assert np.array_equal(one.encode(x), small.encode(x))


def test_bad_input_errors(clustered_embeddings):
    q = ResidualKMeansQuantizer(ResidualKMeansConfig(scale_sizes=[8]))
    with pytest.raises(RuntimeError, match="not fitted"):
        q.encode(clustered_embeddings)
    with pytest.raises(ValueError, match="empty input"):
        q.fit(np.zeros((0, 4), np.float32))
    q.fit(clustered_embeddings)
    bad = clustered_embeddings[:3].copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN/Inf"):
        q.encode(bad)
    with pytest.raises(ValueError, match="width 5, expected 24"):
        q.encode(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="out of range"):
        q.decode(np.array([[8, 0]]))
    with pytest.raises(ValueError, match="needs at least 64 training rows"):
        ResidualKMeansQuantizer(ResidualKMeansConfig(scale_sizes=[64])).fit(clustered_embeddings[:10])
    with pytest.raises(ValueError, match="codebook sizes must be >= 2"):
        ResidualKMeansConfig(scale_sizes=[1])


def test_metric_definitions_on_known_cases():
    x = np.eye(4, dtype=np.float32)
    assert rel_mse(x, x) == 0.0
    assert rel_mse(x, np.tile(x.mean(0), (4, 1))) == pytest.approx(1.0)
    assert utilization(np.array([[0, 1], [1, 1]]), [2, 4]) == 0.25
    assert collision_rate(np.array([[0, 1], [0, 1], [2, 2]])) == pytest.approx(2 / 3)
    rng = np.random.default_rng(0)
    y = rng.normal(size=(200, 8)).astype(np.float32)
    assert recall_at_k(y, y) == 1.0
    assert kendall_tau(y, y) == pytest.approx(1.0)
    assert abs(kendall_tau(y, rng.permutation(y))) < 0.1  # unrelated reconstructions


def test_encode_runs_the_multiscale_op_in_parallel_mode(clustered_embeddings):
    """Each scale's chain restarts from x: the op's "parallel" mode gives the reference's codes."""
    import torch

    from kernels.pytorch.pt_multiscale_encode import pytorch_multiscale_encode

    x = clustered_embeddings
    q = ResidualKMeansQuantizer(ResidualKMeansConfig(scale_sizes=[8, 32], seed=0)).fit(x)
    books = [[torch.from_numpy(q.codebooks[s * 2 + level]) for level in range(2)] for s in range(2)]
    ref = pytorch_multiscale_encode(torch.from_numpy(x), books, None, "parallel")
    assert np.array_equal(q.encode(x), ref.numpy())


def test_encode_tables_are_reused_and_rebuilt_after_a_new_fit(clustered_embeddings):
    x = clustered_embeddings
    q = ResidualKMeansQuantizer(ResidualKMeansConfig(scale_sizes=[8, 16], seed=3)).fit(x)
    first = q.encode(x)
    tables = q._tables[1]
    assert np.array_equal(q.encode(x[:7]), first[:7]) and q._tables[1] is tables
    refit = q.fit(x[::-1].copy() * 2.0)  # other data: other codebooks
    fresh = ResidualKMeansQuantizer(ResidualKMeansConfig(scale_sizes=[8, 16], seed=3)).fit(
        x[::-1].copy() * 2.0)
    assert np.array_equal(refit.encode(x), fresh.encode(x))


def test_baseline_quantizers_fit_the_same_codes_on_one_thread_and_two():
    """A bench compares ID sets fitted on different machines: faiss' residual quantizer
    trainer sums over threads (on 2,000 unit vectors of width 32, 93% of the code tuples
    differed between one thread and two), so the baselines train on one thread, as
    mmtok's do."""
    import faiss

    from quantizer.baselines import FaissPQ, FaissRQ, KMeansQuantizer

    x = np.random.default_rng(0).normal(size=(2000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    threads = faiss.omp_get_max_threads()
    try:
        for make in (lambda: FaissRQ([16, 16, 64]), lambda: FaissPQ(16, nbits=4),
                     lambda: KMeansQuantizer(64, seed=0)):
            codes = []
            for n in (2, 1):
                faiss.omp_set_num_threads(n)
                codes.append(make().fit(x).encode(x))
            assert np.array_equal(*codes), type(make()).__name__
            assert faiss.omp_get_max_threads() == 1  # the caller's setting is given back
    finally:
        faiss.omp_set_num_threads(threads)
