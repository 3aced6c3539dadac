"""Variants that differ only in how the item's content enters the model, trained with
identical architecture and budget, and the quantization loss between them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmdata.split import EventSplit
from ranker.features import FeatureEncoder, ItemContent
from ranker.model import RankerConfig
from ranker.train import evaluate, train_ranker


@dataclass(frozen=True)
class Variant:
    # Feed the item's content IDs as sparse features.
    codes: bool
    # Dense content input: None, "embedding" (the encoder's vector) or "recon" (decode(encode(x))).
    dense: str | None


VARIANTS = {
    "no_content": Variant(codes=False, dense=None),
    "dense": Variant(codes=False, dense="embedding"),
    "recon": Variant(codes=False, dense="recon"),
    "ids": Variant(codes=True, dense=None),
    "ids_dense": Variant(codes=True, dense="embedding"),
}


def lift_lost(auc_dense: float, auc_variant: float) -> float:
    """Share of the dense model's lift over chance that a variant loses (< 0: it wins)."""
    return float((auc_dense - auc_variant) / (auc_dense - 0.5))


def quantization_loss(results: dict[str, dict]) -> dict:
    """``lift_lost`` (ids vs dense), ``lift_lost_cold`` (same, cold items),
    ``lift_lost_recon`` (recon vs dense), for whichever of those variants ran."""
    out = {}
    dense = results.get("dense")
    if dense is None:
        return out
    if "ids" in results:
        out["lift_lost"] = lift_lost(dense["auc"], results["ids"]["auc"])
        out["lift_lost_cold"] = lift_lost(dense["auc_cold"], results["ids"]["auc_cold"])
    if "recon" in results:
        out["lift_lost_recon"] = lift_lost(dense["auc"], results["recon"]["auc"])
    return out


def run_variants(split: EventSplit, item_ids: np.ndarray, *, embeddings: np.ndarray,
                 codes: np.ndarray, code_names: list[str], codebook_sizes: list[int],
                 reconstructions: np.ndarray | None, names: list[str], config: RankerConfig,
                 progress: bool = True, on_result=None) -> dict[str, dict]:
    """Trains and tests each named variant; returns ``{name: metrics}``.

    Args:
        split: the evaluation split.
        item_ids: (n,) items the content arrays describe.
        embeddings: (n, d) content vectors; codes: (n, c) content IDs;
        reconstructions: (n, d) ``decode(codes)``, needed by "recon".
        names: variant names from ``VARIANTS``.
        on_result: called as ``on_result(name, metrics, train_result)`` after each variant.
    """
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    results = {}
    for name in names:
        variant = VARIANTS[name]
        vectors = {"embedding": embeddings, "recon": reconstructions, None: None}[variant.dense]
        if variant.dense == "recon" and reconstructions is None:
            raise ValueError("variant 'recon' needs reconstructions")
        content = ItemContent(item_ids, vectors=vectors, codes=codes if variant.codes else None,
                              code_names=code_names, codebook_sizes=codebook_sizes)
        features = FeatureEncoder.from_config(split.train, content, config,
                                              use_codes=variant.codes,
                                              use_dense_content=vectors is not None)
        train = features.encode(split.train, where="train events")
        valid = features.encode(split.valid, where="validation events")
        test = features.encode(split.test, where="test events")
        trained = train_ranker(features, train, valid, config, progress=progress, desc=name)
        metrics = evaluate(trained.model, features, test)
        metrics["train_examples_per_s"] = trained.train_examples_per_s
        metrics["best_epoch"] = trained.best_epoch
        metrics["history"] = trained.history
        results[name] = metrics
        if on_result is not None:
            on_result(name, metrics, trained)
    return results
