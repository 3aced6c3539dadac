"""Quantizer quality, defined once (README, "Evaluation protocol"), used by the demo,
the benchmarks and the tests.

On held-out embeddings X (n, d) and their reconstructions X^ = decode(encode(X)):

* ``rel_mse``: ||X - X^||^2 / ||X - mean(X)||^2.
* ``recall_at_10``: for each query row, the share of its true top-10 cosine
  neighbours in X (itself excluded) that are also in its top-10 computed on X^.
* ``kendall_tau``: per query, Kendall's tau between its cosine similarities to a fixed
  candidate sample before and after quantization, averaged over queries.
* ``utilization``: share of codes used, per codebook; the minimum over codebooks.
* ``collision_rate``: share of items whose full code tuple another item shares.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import kendalltau

from quantizer.base import total_bits


def rel_mse(x: np.ndarray, x_hat: np.ndarray) -> float:
    x = x.astype(np.float64)
    return float(((x - x_hat) ** 2).sum() / max(((x - x.mean(0)) ** 2).sum(), 1e-30))


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _query_rows(n: int, n_queries: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(n_queries, n), replace=False))


def recall_at_k(x: np.ndarray, x_hat: np.ndarray, *, k: int = 10, n_queries: int = 1000,
                seed: int = 0) -> float:
    n = len(x)
    if n <= k:
        raise ValueError(f"recall_at_{k} needs more than {k} rows, got {n}")
    queries = _query_rows(n, n_queries, seed)
    u, u_hat = _unit(x), _unit(x_hat)
    hits = 0
    for start in range(0, len(queries), 256):
        q = queries[start:start + 256]
        true_sim = u[q] @ u.T  # (Q, n)
        approx_sim = u_hat[q] @ u_hat.T
        rows = np.arange(len(q))
        true_sim[rows, q] = -np.inf  # a query is not its own neighbour
        approx_sim[rows, q] = -np.inf
        truth = np.argpartition(-true_sim, k, axis=1)[:, :k]
        found = np.argpartition(-approx_sim, k, axis=1)[:, :k]
        hits += sum(len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(truth, found))
    return hits / (len(queries) * k)


def kendall_tau(x: np.ndarray, x_hat: np.ndarray, *, n_queries: int = 500,
                n_candidates: int = 100, seed: int = 0) -> float:
    n = len(x)
    rng = np.random.default_rng(seed + 1)
    candidates = rng.choice(n, size=min(n_candidates, n), replace=False)
    queries = _query_rows(n, n_queries, seed)
    u, u_hat = _unit(x), _unit(x_hat)
    before = u[queries] @ u[candidates].T  # (Q, C)
    after = u_hat[queries] @ u_hat[candidates].T
    taus = [kendalltau(b, a).statistic for b, a in zip(before, after)]
    taus = [t for t in taus if np.isfinite(t)]  # a query whose reconstructions all tie
    return float(np.mean(taus)) if taus else 0.0


def utilization(codes: np.ndarray, codebook_sizes: list[int]) -> float:
    shares = [len(np.unique(codes[:, j])) / k for j, k in enumerate(codebook_sizes)]
    return float(min(shares))


def collision_rate(codes: np.ndarray) -> float:
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return float((counts[inverse.ravel()] > 1).mean())


def quantizer_metrics(x: np.ndarray, codes: np.ndarray, x_hat: np.ndarray,
                      codebook_sizes: list[int], *, seed: int = 0) -> dict:
    """Every metric above, for one quantizer on one held-out set."""
    return {
        "bits": total_bits(codebook_sizes),
        "rel_mse": rel_mse(x, x_hat),
        "recall_at_10": recall_at_k(x, x_hat, k=10, seed=seed),
        "kendall_tau": kendall_tau(x, x_hat, seed=seed),
        "utilization": utilization(codes, codebook_sizes),
        "collision_rate": collision_rate(codes),
    }
