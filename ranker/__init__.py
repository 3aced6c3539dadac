"""IDs -> CTR: TorchRec ranking models fed with content IDs beside user, item and context ids."""

from ranker.bundle import ServableModel
from ranker.experiment import (COMPARISONS, VARIANTS, Variant, comparison_intervals, lift_lost,
                               quantization_loss)
from ranker.features import EncodedEvents, FeatureEncoder, IdVocab, ItemContent, kjt_from_columns
from ranker.job import TrainJob, run_train_job
from ranker.metrics import auc, bootstrap_aucs, log_loss, normalized_entropy, ranking_metrics
from ranker.model import RankerConfig, RankingModel
from ranker.train import TrainResult, predict, train_ranker

__all__ = [
    "ServableModel", "TrainJob", "run_train_job",
    "COMPARISONS", "VARIANTS", "Variant", "comparison_intervals", "lift_lost",
    "quantization_loss",
    "EncodedEvents", "FeatureEncoder", "IdVocab", "ItemContent", "kjt_from_columns",
    "auc", "bootstrap_aucs", "log_loss", "normalized_entropy", "ranking_metrics", "RankerConfig",
    "RankingModel", "TrainResult", "predict", "train_ranker",
]
