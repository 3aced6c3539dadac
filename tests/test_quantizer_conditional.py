import copy

import numpy as np
import pytest
import torch

from quantizer import build_quantizer, load_quantizer, save_quantizer
from quantizer.baselines import FaissRQ
from quantizer.conditional import ConditionalRQConfig, ConditionalRQQuantizer
from quantizer.metrics import rel_mse

SMALL = dict(scale_sizes=[8, 16], levels=2, hidden=32, steps=30, batch_size=256,
             validate_every=10, encode_batch_size=600)
N_FIT = 2400  # of the 3000 clustered rows; the rest are held out


@pytest.fixture(scope="module")
def fitted(clustered_embeddings):
    config = ConditionalRQConfig(seed=0, **SMALL)
    return ConditionalRQQuantizer(config).fit(clustered_embeddings[:N_FIT])


def test_shapes_and_code_ranges(fitted, clustered_embeddings):
    x = clustered_embeddings
    assert fitted.code_names == ["code_s_0", "code_s_1", "code_m_0", "code_m_1"]
    assert fitted.codebook_sizes == [8, 8, 16, 16]
    assert fitted.dim == 24
    codes = fitted.encode(x)
    assert codes.shape == (len(x), 4) and codes.dtype == np.int64
    assert (codes >= 0).all() and (codes < np.array(fitted.codebook_sizes)).all()
    x_hat = fitted.decode(codes)
    assert x_hat.shape == x.shape and x_hat.dtype == np.float32
    assert rel_mse(x, x_hat) < 0.5


def test_save_load_gives_identical_codes(tmp_path, fitted, clustered_embeddings):
    x = clustered_embeddings
    directory = save_quantizer(fitted, tmp_path / "q")
    assert {p.name for p in directory.iterdir()} == {"quantizer.json", "weights.safetensors"}
    loaded = load_quantizer(directory)
    assert isinstance(loaded, ConditionalRQQuantizer)
    assert np.array_equal(loaded.encode(x), fitted.encode(x))
    assert np.array_equal(loaded.decode(fitted.encode(x)), fitted.decode(fitted.encode(x)))


def test_same_seed_gives_identical_codes(fitted, clustered_embeddings):
    x = clustered_embeddings
    again = ConditionalRQQuantizer(ConditionalRQConfig(seed=0, **SMALL)).fit(x[:N_FIT])
    assert np.array_equal(again.encode(x), fitted.encode(x))


def test_untrained_network_is_residual_quantization(fitted, clustered_embeddings):
    """With the MLPs' last layers at zero, every codeword is its base codeword, and the
    beam search keeps tuples at least as good as greedy residual quantization's."""
    x = clustered_embeddings
    q = copy.deepcopy(fitted)
    q.net.load_state_dict({k: torch.zeros_like(v) if k.startswith("out.") else v
                           for k, v in q.net.state_dict().items()})
    codes = q.encode(x)
    books = [b.detach().numpy() for b in q.net.codebooks]
    x_hat = sum(book[codes[:, m]] for m, book in enumerate(books))
    assert np.allclose(q.decode(codes), x_hat, atol=1e-6)
    greedy = np.zeros_like(x)
    for book in books:  # beam search never does worse than greedy level by level
        greedy += book[((x - greedy)[:, None, :] - book[None]).__pow__(2).sum(-1).argmin(1)]
    assert ((x - x_hat) ** 2).sum(1).mean() <= ((x - greedy) ** 2).sum(1).mean() + 1e-6


def test_held_out_error_not_worse_than_faiss_rq(fitted, clustered_embeddings):
    """It starts at faiss RQ's codebooks and keeps the best validation step, so on unseen
    rows it is no worse than RQ (up to the 10% of rows it holds out for validation)."""
    fit, held = clustered_embeddings[:N_FIT], clustered_embeddings[N_FIT:]
    q = fitted
    rq = FaissRQ(q.codebook_sizes).fit(fit)
    ours = rel_mse(held, q.decode(q.encode(held)))
    theirs = rel_mse(held, rq.decode(rq.encode(held)))
    assert ours <= theirs * 1.03
    summary = q.training_summary
    assert summary["valid_rel_mse_best"] <= summary["valid_rel_mse_rq_start"]


def test_registry_builds_it():
    q = build_quantizer("conditional_rq", seed=1, steps=7, scale_sizes=[8, 16], levels=2)
    assert isinstance(q, ConditionalRQQuantizer)
    assert q.config.steps == 7 and q.config.seed == 1 and q.codebook_sizes == [8, 8, 16, 16]


def test_rejects_bad_input(fitted):
    with pytest.raises(ValueError):
        fitted.encode(np.zeros((3, 5), dtype=np.float32))
    with pytest.raises(ValueError):
        fitted.decode(np.full((2, 4), 99))
    with pytest.raises(RuntimeError):
        ConditionalRQQuantizer().encode(np.zeros((3, 24), dtype=np.float32))
    with pytest.raises(ValueError):
        ConditionalRQConfig(candidates=0)
