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
