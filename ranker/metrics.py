"""Ranking metrics: AUC, log loss and normalized entropy, overall / warm / cold."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

EPS = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half). NaN if one class only."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks for ties
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def paired_auc_difference(labels: np.ndarray, a: np.ndarray, b: np.ndarray
                          ) -> tuple[float, float]:
    """``(AUC(a) - AUC(b), its standard error)`` for two scorings of the same rows, by
    DeLong's method (DeLong, DeLong & Clarke-Pearson 1988): each positive's and each
    negative's share of the pairs it wins under either scoring, and their covariance
    between the two. NaN if one class only."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan"), float("nan")
    wins_pos, wins_neg = [], []
    for scores in (a, b):
        scores = np.asarray(scores, dtype=np.float64)
        every = rankdata(scores)
        pos, neg = scores[labels], scores[~labels]
        # A positive beats (rank among all) - (rank among positives) negatives.
        wins_pos.append((every[labels] - rankdata(pos)) / n_neg)
        wins_neg.append(1 - (every[~labels] - rankdata(neg)) / n_pos)
    diff = float(wins_pos[0].mean() - wins_pos[1].mean())
    var = (np.var(wins_pos[0] - wins_pos[1], ddof=1) / n_pos
           + np.var(wins_neg[0] - wins_neg[1], ddof=1) / n_neg)
    return diff, float(np.sqrt(max(var, 0.0)))


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(labels, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()) if len(y) else float("nan")


def normalized_entropy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Log loss divided by the entropy of the evaluated rows' own base rate.

    Below 1 means better than always predicting that base rate.
    """
    y = np.asarray(labels, dtype=np.float64)
    if not len(y):
        return float("nan")
    base = float(np.clip(y.mean(), EPS, 1 - EPS))
    entropy = -(base * np.log(base) + (1 - base) * np.log(1 - base))
    return log_loss(y, probs) / entropy


def ranking_metrics(labels: np.ndarray, probs: np.ndarray, is_cold: np.ndarray | None = None) -> dict:
    """AUC / log loss / NE overall, and AUC and row counts on warm and cold items."""
    out = {
        "auc": auc(labels, probs),
        "logloss": log_loss(labels, probs),
        "ne": normalized_entropy(labels, probs),
        "rows": int(len(labels)),
    }
    if is_cold is not None:
        cold = np.asarray(is_cold, dtype=bool)
        for name, mask in (("warm", ~cold), ("cold", cold)):
            out[f"auc_{name}"] = auc(labels[mask], probs[mask])
            out[f"logloss_{name}"] = log_loss(labels[mask], probs[mask])
            out[f"rows_{name}"] = int(mask.sum())
    return out


class _SortedScores:
    """One score vector sorted once, for AUCs under many weightings of its rows."""

    def __init__(self, labels: np.ndarray, scores: np.ndarray) -> None:
        self.order = np.argsort(scores, kind="stable")
        s = scores[self.order]
        self.y = labels[self.order].astype(np.float32)
        self.starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # each tie group's start

    def aucs(self, weights: np.ndarray) -> np.ndarray:
        """AUC under each column of ``weights`` (N, B): the Mann-Whitney statistic with
        every example counted as often as its weight says, ties counted half. (B,)."""
        w = weights[self.order]  # (N, B), rows in score order
        pos, neg = w * self.y[:, None], w * (1 - self.y[:, None])
        if len(self.starts) < len(self.order):  # ties: one row per tie group
            pos = np.add.reduceat(pos, self.starts, axis=0)  # (G, B)
            neg = np.add.reduceat(neg, self.starts, axis=0)
        below = np.cumsum(neg, axis=0) - neg  # negative weight strictly below each group
        with np.errstate(invalid="ignore", divide="ignore"):
            return ((pos * (below + 0.5 * neg)).sum(0, dtype=np.float64)
                    / (pos.sum(0, dtype=np.float64) * neg.sum(0, dtype=np.float64)))


def bootstrap_aucs(labels: np.ndarray, scores: dict[str, np.ndarray], *,
                   subsets: dict[str, np.ndarray] | None = None, n_boot: int = 1000,
                   seed: int = 0, block: int = 50,
                   resample_seeds: bool = True) -> dict[tuple[str, str], np.ndarray]:
    """Bootstrap of test AUC over the test rows and the training seeds: every variant is
    scored on the same ``n_boot`` resamples of the rows (drawn with replacement), so
    differences between variants keep their pairing; and a variant trained with S > 1
    seeds has its seeds drawn with replacement too, independently per variant and
    resample, so the spread covers what the test set's size and what training's seed
    leave uncertain. (With few seeds the seed part is rough: 3 seeds bound it loosely.)

    Args:
        labels: (N,) 0/1.
        scores: variant -> (N,) scores, or (S, N) for S seeds of that variant (its AUC
            on a resample is then the mean of the drawn seeds' AUCs, as a multi-seed
            report's is the mean of its seeds').
        subsets: name -> (N,) bool mask of the rows to score on (e.g. ``{"all": ...,
            "cold": is_cold}``): a resample's rows inside the mask, so the subset's
            intervals come from the same draws as the whole set's.
        n_boot: resamples. block: resamples drawn at once (memory: a few block x N floats).
        resample_seeds: draw the seeds too (False: the rows only, the seeds averaged).

    Returns:
        ``{(variant, subset): (n_boot,) AUCs}``.

    Example::

        boot = bootstrap_aucs(y, {"dense": p_dense, "ids": p_ids})
        diff = boot["ids", "all"] - boot["dense", "all"]
        low, high = np.quantile(diff, [0.025, 0.975])
    """
    labels = np.asarray(labels).astype(np.float64)
    n = len(labels)
    subsets = subsets or {"all": np.ones(n, dtype=bool)}
    rng = np.random.default_rng(seed)
    out: dict[tuple[str, str], list[np.ndarray]] = {
        (v, s): [] for v in scores for s in subsets}
    masks = {name: np.asarray(mask, dtype=bool) for name, mask in subsets.items()}
    per_seed = {v: np.atleast_2d(np.asarray(s, dtype=np.float64)) for v, s in scores.items()}
    sorted_scores = {(v, name): [_SortedScores(labels[mask], row[mask]) for row in rows]
                     for v, rows in per_seed.items() for name, mask in masks.items()}
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        draws = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        # (N, b) float32: integer counts, exact; a row per test row gathers contiguously.
        counts = np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).T.astype(np.float32)
        # (S, b) each seed's weight in each resample's mean: the share of S draws it got.
        seed_weights = {v: (rng.multinomial(len(rows), np.full(len(rows), 1 / len(rows)),
                                            size=b).T / len(rows)
                            if resample_seeds and len(rows) > 1
                            else np.full((len(rows), b), 1 / len(rows)))
                        for v, rows in per_seed.items()}
        for (variant, subset), seeds in sorted_scores.items():
            w = counts[masks[subset]]
            aucs = np.stack([s.aucs(w) for s in seeds])  # (S, b)
            out[variant, subset].append((aucs * seed_weights[variant]).sum(axis=0))
    return {key: np.concatenate(parts) for key, parts in out.items()}
