"""Embedding -> discrete IDs: quantizers behind one ``fit / encode / decode`` interface."""

from quantizer.base import Quantizer, encode_items, item_codes_frame, total_bits
from quantizer.metrics import quantizer_metrics
from quantizer.residual_kmeans import (
    ResidualKMeansConfig,
    ResidualKMeansQuantizer,
    nearest_code,
)

__all__ = [
    "Quantizer", "encode_items", "item_codes_frame", "total_bits", "quantizer_metrics",
    "ResidualKMeansConfig", "ResidualKMeansQuantizer", "nearest_code",
]
