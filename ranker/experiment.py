"""Variants that differ only in how the item's content enters the model, trained with
identical architecture and budget, and the quantization loss between them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ranker.metrics import auc, bootstrap_aucs


@dataclass(frozen=True)
class Variant:
    # Feed the item's content IDs as sparse features.
    codes: bool
    # Dense content input: None, "embedding" (the encoder's vector) or "recon" (decode(encode(x))).
    dense: str | None

    @property
    def reads_codes(self) -> bool:
        """Whether the variant needs the items' codes (and the quantizer that made them):
        as features, or decoded into its content vectors."""
        return self.codes or self.dense == "recon"


VARIANTS = {
    "no_content": Variant(codes=False, dense=None),
    "dense": Variant(codes=False, dense="embedding"),
    "recon": Variant(codes=False, dense="recon"),
    "ids": Variant(codes=True, dense=None),
    "ids_dense": Variant(codes=True, dense="embedding"),
}


def lift_lost(auc_dense, auc_variant, auc_base=0.5):
    """Share of the dense model's lift over ``auc_base`` that a variant loses (< 0: it
    wins): over chance (0.5) by default; over the no-content model's AUC, the share of
    what content adds (``content_lift_lost``). Floats, or arrays of them (e.g. bootstrap
    resamples) elementwise."""
    lost = (np.asarray(auc_dense) - auc_variant) / (np.asarray(auc_dense) - auc_base)
    return float(lost) if np.ndim(lost) == 0 else lost


def quantization_loss(results: dict[str, dict]) -> dict:
    """For whichever variants ran: ``lift_lost`` (ids vs dense), ``lift_lost_cold`` (same,
    cold items), ``lift_lost_recon`` (recon vs dense), each over chance; and beside each
    the ``content_lift_lost`` form, over ``no_content``'s AUC (the share of what content
    adds that the variant loses), also for every baseline's IDs
    (``content_lift_lost_<name>_ids``). Meaningful only where ``dense`` clearly beats
    ``no_content`` (``comparison_intervals``' ``dense_vs_no_content`` says)."""
    out = {}
    dense, base = results.get("dense"), results.get("no_content")
    if dense is None:
        return out
    pairs = {"": ("ids", "auc"), "_cold": ("ids", "auc_cold"), "_recon": ("recon", "auc")}
    pairs |= {f"_{name}": (name, "auc") for name in results if name.endswith("_ids")}
    for suffix, (variant, key) in pairs.items():
        if variant not in results:
            continue
        if suffix in ("", "_cold", "_recon"):
            out[f"lift_lost{suffix}"] = lift_lost(dense[key], results[variant][key])
        if base is not None:
            out[f"content_lift_lost{suffix}"] = lift_lost(dense[key], results[variant][key],
                                                          base[key])
    return out


# Resamples of the test rows behind each interval the reports give.
BOOTSTRAP_RESAMPLES = 1000

# MmDict's claim for content rebuilt from the IDs: under 1% of the task's lift lost.
LIFT_LOST_BAR = 0.01

# The report's comparisons: key -> (variant V, reference R, test rows, measure).
# "lift_lost" is lift_lost(AUC_R, AUC_V) over chance, "content_lift_lost" the same over
# no_content's AUC (V wins below 0); "auc_diff" is AUC_V - AUC_R (V wins above 0).
COMPARISONS = {
    "lift_lost": ("ids", "dense", "all", "lift_lost"),
    "lift_lost_cold": ("ids", "dense", "cold", "lift_lost"),
    "lift_lost_recon": ("recon", "dense", "all", "lift_lost"),
    "content_lift_lost": ("ids", "dense", "all", "content_lift_lost"),
    "content_lift_lost_cold": ("ids", "dense", "cold", "content_lift_lost"),
    "content_lift_lost_recon": ("recon", "dense", "all", "content_lift_lost"),
    "dense_vs_no_content": ("dense", "no_content", "all", "auc_diff"),
    "ids_dense_vs_dense": ("ids_dense", "dense", "all", "auc_diff"),
    "ids_vs_no_content_cold": ("ids", "no_content", "cold", "auc_diff"),
    "task_ids_vs_ids": ("task_ids", "ids", "all", "auc_diff"),
    "task_ids_vs_ids_cold": ("task_ids", "ids", "cold", "auc_diff"),
}
# The bench's variant of task-aware IDs (``quantizer.task_aware``), compared with the
# content-only ``ids`` above rather than as a baseline quantizer's.
TASK_VARIANT = "task_ids"
# And for each baseline quantizer's IDs that ran: ids_vs_<name>_ids, mmtok's IDs against
# the baseline's (auc_diff on all rows).
# The variant a content_lift_lost is measured over.
CONTENT_BASE = "no_content"


def comparison_intervals(labels: np.ndarray, is_cold: np.ndarray, scores: dict[str, np.ndarray],
                         *, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                         level: float = 0.95) -> dict:
    """How sure the test set and the training seeds let a report be of each of
    ``COMPARISONS`` whose variants ran, and of mmtok's IDs against each baseline's
    (``<name>_ids`` in ``scores``: ``ids_vs_<name>_ids`` and ``content_lift_lost_<name>_ids``):
    a bootstrap paired over the test rows that also
    draws each variant's seeds (``metrics.bootstrap_aucs``), so seeds that disagree
    widen the interval.

    Args:
        labels: (N,) test labels; is_cold: (N,) bool.
        scores: variant -> (N,) or (S, N) test scores (S seeds, averaged as the report's
            AUCs are), every variant's rows in the same order.

    Returns:
        ``{key: {"variant", "reference", "rows", "measure", "value", "low", "high",
        "p_favourable"}}``: what is compared (as in ``COMPARISONS``), the comparison on the
        whole test set, its ``level`` interval, and the share of resamples on which V comes
        out ahead of R; a lift-lost entry adds ``p_under_bar``, the share under
        ``LIFT_LOST_BAR``. With one seed per variant the interval covers the test rows
        only. A comparison whose rows hold one class only (e.g. no cold test rows) is
        left out.
    """
    other_ids = [name for name in scores if name.endswith("_ids")]
    specs = COMPARISONS | {f"ids_vs_{name}": ("ids", name, "all", "auc_diff")
                           for name in other_ids if name != TASK_VARIANT}
    specs |= {f"content_lift_lost_{name}": (name, "dense", "all", "content_lift_lost")
              for name in other_ids}
    wanted = {k: c for k, c in specs.items() if c[0] in scores and c[1] in scores
              and (c[3] != "content_lift_lost" or CONTENT_BASE in scores)}
    if not wanted:
        return {}
    cold = np.asarray(is_cold, dtype=bool)
    subsets = {"all": np.ones(len(labels), dtype=bool), "cold": cold}
    subsets = {name: subsets[name] for name in {c[2] for c in wanted.values()}}
    used = {v: scores[v] for c in wanted.values() for v in c[:2]}
    if any(c[3] == "content_lift_lost" for c in wanted.values()):
        used[CONTENT_BASE] = scores[CONTENT_BASE]
    boot = bootstrap_aucs(labels, used, subsets=subsets, n_boot=n_boot, seed=seed)
    out = {}
    for key, (variant, reference, rows, measure) in wanted.items():
        def value(auc_v, auc_r, auc_base):
            if measure == "lift_lost":
                return lift_lost(auc_r, auc_v)
            if measure == "content_lift_lost":
                return lift_lost(auc_r, auc_v, auc_base)
            return auc_v - auc_r
        mask = subsets[rows]
        base = CONTENT_BASE if measure == "content_lift_lost" else reference
        whole = {v: float(np.mean([auc(labels[mask], s[mask]) for s in np.atleast_2d(used[v])]))
                 for v in (variant, reference, base)}
        with np.errstate(divide="ignore", invalid="ignore"):
            samples = value(boot[variant, rows], boot[reference, rows], boot[base, rows])
        samples = samples[np.isfinite(samples)]
        if not len(samples):  # e.g. no cold test rows, or cold rows of one class only
            continue
        low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
        favourable = samples > 0 if measure == "auc_diff" else samples < 0
        with np.errstate(divide="ignore", invalid="ignore"):
            point = float(value(whole[variant], whole[reference], whole[base]))
        out[key] = {"variant": variant, "reference": reference, "rows": rows,
                    "measure": measure, "value": point,
                    "low": float(low), "high": float(high),
                    "p_favourable": float(favourable.mean())}
        if measure == "lift_lost":  # MmDict's bar for the loss
            out[key]["p_under_bar"] = float((samples < LIFT_LOST_BAR).mean())
    return out
