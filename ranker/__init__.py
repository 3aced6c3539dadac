"""IDs -> CTR: TorchRec ranking models fed with content IDs beside user, item and context ids."""

from ranker.experiment import VARIANTS, Variant, lift_lost, quantization_loss, run_variants
from ranker.features import EncodedEvents, FeatureEncoder, IdVocab, ItemContent, kjt_from_columns
from ranker.metrics import auc, log_loss, normalized_entropy, ranking_metrics
from ranker.model import RankerConfig, RankingModel
from ranker.train import TrainResult, evaluate, predict, train_ranker

__all__ = [
    "VARIANTS", "Variant", "lift_lost", "quantization_loss", "run_variants",
    "EncodedEvents", "FeatureEncoder", "IdVocab", "ItemContent", "kjt_from_columns",
    "auc", "log_loss", "normalized_entropy", "ranking_metrics", "RankerConfig",
    "RankingModel", "TrainResult", "evaluate", "predict", "train_ranker",
]
