"""Embedding -> discrete IDs: quantizers behind one ``fit / encode / decode / save / load``
interface, and the registry that builds, saves and loads them by kind."""

from quantizer.base import Quantizer, encode_items, item_codes_frame, total_bits
from quantizer.metrics import quantizer_metrics
from quantizer.mmdict import MmDictConfig, MmDictQuantizer
from quantizer.registry import (QUANTIZERS, build_quantizer, build_quantizers, load_quantizer,
                                save_quantizer)
from quantizer.task_aware import TASK_SIGNALS, Engagement
from quantizer.residual_kmeans import (
    ResidualKMeansConfig,
    ResidualKMeansQuantizer,
    nearest_code,
)

__all__ = [
    "Quantizer", "encode_items", "item_codes_frame", "total_bits", "quantizer_metrics",
    "MmDictConfig", "MmDictQuantizer", "ResidualKMeansConfig", "ResidualKMeansQuantizer",
    "nearest_code", "QUANTIZERS", "build_quantizer", "build_quantizers", "load_quantizer",
    "save_quantizer", "TASK_SIGNALS", "Engagement",
]
