"""What a ranking engineer would otherwise pick, behind the same ``fit / encode / decode``
interface, so their IDs feed the ranker exactly as mmtok's do.

* ``FaissRQ``: faiss ``ResidualQuantizer`` with the same per-level codebook sizes as
  mmtok (so the same total bits), beam search as faiss defaults it (``beam_size=5``).
* ``FaissPQ``: faiss ``ProductQuantizer`` at the same total bits.
* ``KMeansQuantizer``: one faiss k-means codebook (a single ID per item).
* ``LSHQuantizer``: random-projection sign hashing at the same total bits, the bits
  grouped into IDs; decoded by a least-squares map from the signs back to the vector.

faiss packs codes into bit strings; ``unpack_codes`` / ``pack_codes`` turn them into one
int64 column per level and back (LSB first, faiss' BitstringWriter order).

Each saves as every quantizer does, without pickle: its constructor arguments in
``quantizer.json``, its fitted arrays in ``state.safetensors`` (a faiss index as the
uint8 bytes of ``faiss.serialize_index``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from quantizer.base import (as_rows, check_codes, check_input, read_quantizer_meta,
                            single_threaded, write_quantizer_meta)


def unpack_codes(packed: np.ndarray, nbits: list[int]) -> np.ndarray:
    """(n, code_size) uint8 faiss codes -> (n, len(nbits)) int64 indices."""
    bits = np.unpackbits(packed, axis=1, bitorder="little").astype(np.int64)  # (n, 8 * code_size)
    out = np.zeros((len(packed), len(nbits)), dtype=np.int64)
    offset = 0
    for j, nb in enumerate(nbits):
        weights = 1 << np.arange(nb, dtype=np.int64)
        out[:, j] = bits[:, offset:offset + nb] @ weights
        offset += nb
    return out


def pack_codes(codes: np.ndarray, nbits: list[int]) -> np.ndarray:
    """Inverse of ``unpack_codes``."""
    total = sum(nbits)
    code_size = (total + 7) // 8
    bits = np.zeros((len(codes), code_size * 8), dtype=np.uint8)
    offset = 0
    for j, nb in enumerate(nbits):
        bits[:, offset:offset + nb] = (codes[:, j:j + 1] >> np.arange(nb)) & 1
        offset += nb
    return np.packbits(bits, axis=1, bitorder="little")


def _log2_exact(k: int) -> int:
    nb = int(round(np.log2(k)))
    if 1 << nb != k:
        raise ValueError(f"faiss codebooks need power-of-two sizes, got {k}")
    return nb


def train_rq_codebooks(x: np.ndarray, codebook_sizes: list[int], *, beam_size: int = 5,
                       max_rows: int = 100_000) -> list[np.ndarray] | None:
    """Codebooks of faiss' residual quantizer trainer (beam search) on the first
    ``max_rows`` rows of x (n, d); one (k, d) array per level, or None when a size is
    not a power of two (faiss' requirement). The start of mmtok's learned quantizers."""
    import faiss

    nbits = [int(round(np.log2(k))) for k in codebook_sizes]
    if any(1 << b != k for b, k in zip(nbits, codebook_sizes)):
        return None
    vec = faiss.UInt64Vector()
    for b in nbits:
        vec.push_back(b)
    rq = faiss.ResidualQuantizer(x.shape[1], vec)
    rq.max_beam_size = beam_size
    rq.train(np.ascontiguousarray(x[:max_rows], dtype=np.float32))
    flat = faiss.vector_to_array(rq.codebooks).reshape(-1, x.shape[1])
    return [book.copy() for book in np.split(flat, np.cumsum(codebook_sizes)[:-1])]


class _SavedBaseline:
    """``save`` / ``load`` for the baselines: ``_config()`` is what the constructor takes,
    ``_state()`` / ``_restore()`` the fitted arrays."""

    kind: str
    dim: int | None

    def _config(self) -> dict:
        raise NotImplementedError

    def _state(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _restore(self, state: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def _check_fitted(self) -> None:
        if self.dim is None:
            raise RuntimeError(f"{self.kind} quantizer is not fitted: call fit(x) or "
                               "load(dir) first")

    def save(self, directory: str | Path) -> Path:
        self._check_fitted()
        directory = write_quantizer_meta(
            directory, {"kind": self.kind, "dim": self.dim, "config": self._config()})
        save_file(self._state(), str(directory / "state.safetensors"))
        return directory

    @classmethod
    def load(cls, directory: str | Path):
        meta = read_quantizer_meta(directory, cls.kind)
        quantizer = cls(**meta["config"])
        quantizer._restore(load_file(str(Path(directory) / "state.safetensors")))
        quantizer.dim = int(meta["dim"])
        return quantizer


def _serialize(index) -> np.ndarray:
    import faiss

    return faiss.serialize_index(index)  # (n_bytes,) uint8


def _deserialize(blob: np.ndarray):
    import faiss

    return faiss.deserialize_index(np.ascontiguousarray(blob, dtype=np.uint8))


class FaissRQ(_SavedBaseline):
    kind = "faiss_rq"

    def __init__(self, codebook_sizes: list[int], *, beam_size: int = 5, name: str = "rq") -> None:
        self.nbits = [_log2_exact(k) for k in codebook_sizes]
        self.codebook_sizes = list(codebook_sizes)
        self.code_names = [f"code_{name}_{j}" for j in range(len(codebook_sizes))]
        self.beam_size, self.name = beam_size, name
        self.index = None  # faiss.IndexResidualQuantizer; its .rq encodes and decodes
        self.dim = None

    def fit(self, x: np.ndarray, *, progress: bool = False) -> "FaissRQ":
        """x: (n, d) float32. ``progress`` is accepted for interface parity."""
        import faiss

        x = check_input(x)
        nbits = faiss.UInt64Vector()
        for nb in self.nbits:
            nbits.push_back(nb)
        # The index only carries the quantizer, so that faiss can serialize it.
        index = faiss.IndexResidualQuantizer(x.shape[1], nbits)
        index.rq.max_beam_size = self.beam_size
        with single_threaded():  # faiss' RQ trainer gives other codes on other thread counts
            index.train(x)
        self.index, self.dim = index, x.shape[1]
        return self

    def encode(self, x: np.ndarray, *, validate: bool = True) -> np.ndarray:
        self._check_fitted()
        x = check_input(x, self.dim) if validate else as_rows(x)
        return unpack_codes(self.index.rq.compute_codes(x), self.nbits)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        self._check_fitted()
        codes = check_codes(codes, self.codebook_sizes)
        return self.index.rq.decode(pack_codes(codes, self.nbits))

    def _config(self) -> dict:
        return {"codebook_sizes": self.codebook_sizes, "beam_size": self.beam_size,
                "name": self.name}

    def _state(self) -> dict[str, np.ndarray]:
        return {"index": _serialize(self.index)}

    def _restore(self, state: dict[str, np.ndarray]) -> None:
        self.index = _deserialize(state["index"])


class FaissPQ(_SavedBaseline):
    """faiss PQ with ``n_sub`` sub-quantizers of ``2**nbits`` codes; the input is
    zero-padded to a multiple of ``n_sub`` when needed."""

    kind = "faiss_pq"

    def __init__(self, total_bits: int, *, nbits: int = 6) -> None:
        if total_bits % nbits:
            raise ValueError(f"PQ: total bits {total_bits} must be a multiple of nbits {nbits}")
        self.total_bits = total_bits
        self.n_sub = total_bits // nbits
        self.nbits = [nbits] * self.n_sub
        self.codebook_sizes = [1 << nbits] * self.n_sub
        self.code_names = [f"code_pq_{j}" for j in range(self.n_sub)]
        self.index = None  # faiss.IndexPQ; its .pq encodes and decodes
        self.dim = None

    def _pad(self, x: np.ndarray) -> np.ndarray:
        dim = x.shape[1]
        padded = -(-dim // self.n_sub) * self.n_sub
        if padded == dim:
            return x
        return np.ascontiguousarray(np.pad(x, ((0, 0), (0, padded - dim))))

    def fit(self, x: np.ndarray, *, progress: bool = False) -> "FaissPQ":
        """x: (n, d) float32. ``progress`` is accepted for interface parity."""
        import faiss

        x = check_input(x)
        xp = self._pad(x)
        index = faiss.IndexPQ(xp.shape[1], self.n_sub, self.nbits[0])
        with single_threaded():  # the same codebooks on any thread count
            index.train(xp)
        self.index, self.dim = index, x.shape[1]
        return self

    def encode(self, x: np.ndarray, *, validate: bool = True) -> np.ndarray:
        self._check_fitted()
        x = check_input(x, self.dim) if validate else as_rows(x)
        return unpack_codes(self.index.pq.compute_codes(self._pad(x)), self.nbits)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        self._check_fitted()
        codes = check_codes(codes, self.codebook_sizes)
        return self.index.pq.decode(pack_codes(codes, self.nbits))[:, : self.dim]

    def _config(self) -> dict:
        return {"total_bits": self.total_bits, "nbits": self.nbits[0]}

    def _state(self) -> dict[str, np.ndarray]:
        return {"index": _serialize(self.index)}

    def _restore(self, state: dict[str, np.ndarray]) -> None:
        self.index = _deserialize(state["index"])


class KMeansQuantizer(_SavedBaseline):
    kind = "kmeans"

    def __init__(self, k: int, *, seed: int = 0, iters: int = 25) -> None:
        self.codebook_sizes = [k]
        self.code_names = ["code_km_0"]
        self.seed, self.iters = seed, iters
        self.centroids = None  # (k, d) float32
        self.dim = None

    def fit(self, x: np.ndarray, *, progress: bool = False) -> "KMeansQuantizer":
        """x: (n, d) float32. ``progress`` is accepted for interface parity."""
        import faiss

        x = check_input(x)
        km = faiss.Kmeans(x.shape[1], self.codebook_sizes[0], niter=self.iters, seed=self.seed,
                          min_points_per_centroid=1)
        with single_threaded():  # the same centroids on any thread count
            km.train(x)
        self.centroids, self.dim = km.centroids.astype(np.float32), x.shape[1]
        return self

    def encode(self, x: np.ndarray, *, validate: bool = True) -> np.ndarray:
        import faiss

        self._check_fitted()
        x = check_input(x, self.dim) if validate else as_rows(x)
        index = faiss.IndexFlatL2(self.dim)
        index.add(self.centroids)
        return index.search(x, 1)[1].astype(np.int64)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        self._check_fitted()
        codes = check_codes(codes, self.codebook_sizes)
        return self.centroids[codes[:, 0]]

    def _config(self) -> dict:
        return {"k": self.codebook_sizes[0], "seed": self.seed, "iters": self.iters}

    def _state(self) -> dict[str, np.ndarray]:
        return {"centroids": self.centroids}

    def _restore(self, state: dict[str, np.ndarray]) -> None:
        self.centroids = state["centroids"]


class LSHQuantizer(_SavedBaseline):
    """Sign random projections (SimHash), ``bits_per_code`` bits per ID."""

    kind = "lsh"

    def __init__(self, total_bits: int, *, bits_per_code: int = 6, seed: int = 0) -> None:
        if total_bits % bits_per_code:
            raise ValueError(f"LSH: total bits {total_bits} must be a multiple of {bits_per_code}")
        self.total_bits, self.bits_per_code, self.seed = total_bits, bits_per_code, seed
        n_codes = total_bits // bits_per_code
        self.codebook_sizes = [1 << bits_per_code] * n_codes
        self.code_names = [f"code_lsh_{j}" for j in range(n_codes)]
        self.planes = self.back = self.mean = None  # (d, bits), (bits, d), (d,) float32
        self.dim = None

    def _signs(self, x: np.ndarray) -> np.ndarray:
        return np.where((x - self.mean) @ self.planes > 0, 1.0, -1.0).astype(np.float32)

    def fit(self, x: np.ndarray, *, progress: bool = False) -> "LSHQuantizer":
        """x: (n, d) float32. ``progress`` is accepted for interface parity."""
        x = check_input(x)
        rng = np.random.default_rng(self.seed)
        self.planes = rng.normal(size=(x.shape[1], self.total_bits)).astype(np.float32)
        self.mean = x.mean(0)
        signs = self._signs(x)
        # least-squares decoder: signs (n, bits) -> centred vectors (n, d)
        self.back = np.linalg.lstsq(signs, x - self.mean, rcond=None)[0].astype(np.float32)
        self.dim = x.shape[1]
        return self

    def encode(self, x: np.ndarray, *, validate: bool = True) -> np.ndarray:
        self._check_fitted()
        x = check_input(x, self.dim) if validate else as_rows(x)
        bits = (self._signs(x) > 0).astype(np.int64).reshape(len(x), -1, self.bits_per_code)
        return bits @ (1 << np.arange(self.bits_per_code, dtype=np.int64))  # (n, n_codes)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        self._check_fitted()
        codes = check_codes(codes, self.codebook_sizes)
        bits = (codes[:, :, None] >> np.arange(self.bits_per_code)) & 1  # (n, C, b)
        signs = np.where(bits.reshape(len(codes), -1) > 0, 1.0, -1.0).astype(np.float32)
        return signs @ self.back + self.mean

    def _config(self) -> dict:
        return {"total_bits": self.total_bits, "bits_per_code": self.bits_per_code,
                "seed": self.seed}

    def _state(self) -> dict[str, np.ndarray]:
        return {"planes": self.planes, "back": self.back, "mean": self.mean}

    def _restore(self, state: dict[str, np.ndarray]) -> None:
        self.planes, self.back, self.mean = state["planes"], state["back"], state["mean"]
