"""IDs -> CTR: TorchRec ranking models fed with content IDs beside user, item and context ids."""

from ranker.experiment import (COMPARISONS, VARIANTS, Variant, comparison_intervals, lift_lost,
                               quantization_loss, run_variants)
from ranker.features import EncodedEvents, FeatureEncoder, IdVocab, ItemContent, kjt_from_columns
from ranker.metrics import auc, bootstrap_aucs, log_loss, normalized_entropy, ranking_metrics
from ranker.model import RankerConfig, RankingModel
from ranker.train import TrainResult, evaluate, predict, train_ranker

__all__ = [
    "COMPARISONS", "VARIANTS", "Variant", "comparison_intervals", "lift_lost",
    "quantization_loss", "run_variants",
    "EncodedEvents", "FeatureEncoder", "IdVocab", "ItemContent", "kjt_from_columns",
    "auc", "bootstrap_aucs", "log_loss", "normalized_entropy", "ranking_metrics", "RankerConfig",
    "RankingModel", "TrainResult", "evaluate", "predict", "train_ranker",
]
