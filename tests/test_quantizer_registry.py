"""The quantizer registry: every kind saves without pickle and loads back identical."""

import json
import re

import numpy as np
import pytest

from quantizer import (QUANTIZERS, MmDictConfig, MmDictQuantizer, Quantizer, ResidualKMeansConfig,
                       ResidualKMeansQuantizer, build_quantizer, build_quantizers, load_quantizer,
                       save_quantizer, total_bits)
from quantizer.baselines import FaissPQ, FaissRQ, KMeansQuantizer, LSHQuantizer
from quantizer.conditional import ConditionalRQConfig, ConditionalRQQuantizer

# Small, fast settings per kind; non-default arguments, so a load that forgot one shows.
SMALL = {
    "conditional_rq": lambda: ConditionalRQQuantizer(ConditionalRQConfig(
        scale_sizes=[4, 8], steps=10, batch_size=256, hidden=16, seed=1)),
    "mmdict": lambda: MmDictQuantizer(MmDictConfig(scale_sizes=[4, 8], steps=20, batch_size=256,
                                                   decoder_hidden=16, seed=1)),
    "residual_kmeans": lambda: ResidualKMeansQuantizer(ResidualKMeansConfig(scale_sizes=[4, 8],
                                                                            seed=1)),
    "faiss_rq": lambda: FaissRQ([4, 16, 16], beam_size=1, name="frq"),
    "faiss_pq": lambda: FaissPQ(10, nbits=2),  # 5 sub-quantizers: 24 columns padded to 25
    "kmeans": lambda: KMeansQuantizer(16, seed=1, iters=10),
    "lsh": lambda: LSHQuantizer(12, bits_per_code=4, seed=1),
}


def test_every_registered_kind_is_covered():
    assert set(SMALL) == set(QUANTIZERS)
    assert all(cls.kind == kind for kind, cls in QUANTIZERS.items())


@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
def test_save_load_round_trip(kind, tmp_path, clustered_embeddings):
    x = clustered_embeddings
    q = SMALL[kind]()
    assert q.kind == kind and q.dim is None
    assert q.fit(x, progress=False) is q
    assert isinstance(q, Quantizer) and q.dim == x.shape[1]
    codes = q.encode(x)
    assert codes.dtype == np.int64 and codes.shape == (len(x), len(q.code_names))
    assert (codes >= 0).all() and (codes < np.array(q.codebook_sizes)).all()

    directory = save_quantizer(q, tmp_path / "q")
    assert directory == tmp_path / "q"
    names = {p.name for p in directory.iterdir()}
    assert "quantizer.json" in names and all(n.endswith((".json", ".safetensors")) for n in names)
    loaded = load_quantizer(directory)
    assert type(loaded) is type(q)
    assert (loaded.dim, loaded.code_names, loaded.codebook_sizes) == \
        (q.dim, q.code_names, q.codebook_sizes)
    np.testing.assert_array_equal(loaded.encode(x), codes)
    np.testing.assert_array_equal(loaded.decode(codes), q.decode(codes))

    # validate=False trusts the caller: same codes, even from a read-only buffer.
    frozen = x.copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(loaded.encode(frozen, validate=False), codes)


@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
def test_validate_is_the_default_and_unfitted_is_refused(kind, tmp_path, clustered_embeddings):
    q = SMALL[kind]()
    with pytest.raises(RuntimeError, match="not fitted"):
        q.save(tmp_path / "q")
    q.fit(clustered_embeddings)
    bad = clustered_embeddings[:3].copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN/Inf"):
        q.encode(bad)
    with pytest.raises(ValueError, match="width 5, expected 24"):
        q.encode(np.zeros((2, 5), np.float32))


def test_unknown_kind_and_missing_meta_are_refused_naming_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}: no quantizer.json")):
        load_quantizer(tmp_path)
    (tmp_path / "quantizer.json").write_text(json.dumps({"kind": "pickle_jar", "dim": 4}))
    known = ", ".join(sorted(QUANTIZERS))
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path}: quantizer kind 'pickle_jar' is unknown; known kinds: {known}")):
        load_quantizer(tmp_path)
    (tmp_path / "quantizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_quantizer(tmp_path)


def test_a_kind_refuses_a_directory_of_another_kind(tmp_path, clustered_embeddings):
    save_quantizer(SMALL["lsh"]().fit(clustered_embeddings), tmp_path / "q")
    with pytest.raises(ValueError, match="holds a 'lsh' quantizer, not 'kmeans'"):
        KMeansQuantizer.load(tmp_path / "q")


def test_build_quantizer_by_command_line_name():
    q = build_quantizer("mmdict", seed=3, steps=7, scale_sizes=[4, 8], levels=3)
    assert isinstance(q, MmDictQuantizer)
    cfg = q.config
    assert (cfg.seed, cfg.steps, cfg.scale_sizes, cfg.levels) == (3, 7, [4, 8], 3)
    assert MmDictQuantizer().config.steps == build_quantizer("mmdict", seed=0).config.steps
    rq = build_quantizer("rq-kmeans", seed=2, scale_sizes=[8])
    assert isinstance(rq, ResidualKMeansQuantizer)
    assert (rq.config.seed, rq.config.scale_sizes, rq.config.levels) == (2, [8], 2)
    with pytest.raises(ValueError, match="choose 'mmdict', 'rq-kmeans'"):
        build_quantizer("faiss_rq", seed=0)
    assert build_quantizer("mmdict", seed=0).config.mode == "parallel"  # the default
    assert build_quantizer("mmdict", seed=0, scale_mode="cascade").config.mode == "cascade"
    assert build_quantizers([8, 16], 2, seed=0, steps=None,
                            scale_mode="cascade")["mmtok"].config.mode == "cascade"
    with pytest.raises(ValueError, match="mmdict option"):
        build_quantizer("rq-kmeans", seed=0, scale_mode="parallel")


def test_build_quantizers_at_equal_bits():
    qs = build_quantizers([16, 64, 256], 2, seed=0, steps=None)
    assert list(qs) == ["mmtok", "faiss_rq", "faiss_pq", "kmeans", "lsh"]
    bits = {name: total_bits(q.codebook_sizes) for name, q in qs.items()}
    assert bits == {"mmtok": 36, "faiss_rq": 36, "faiss_pq": 36, "kmeans": 8, "lsh": 36}
    assert qs["faiss_rq"].codebook_sizes == qs["mmtok"].codebook_sizes
