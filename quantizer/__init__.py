"""Embedding -> discrete IDs: quantizers behind one ``fit / encode / decode`` interface."""

from quantizer.base import Quantizer, encode_items, item_codes_frame, total_bits
from quantizer.residual_kmeans import (
    ResidualKMeansConfig,
    ResidualKMeansQuantizer,
    nearest_code,
)

__all__ = [
    "Quantizer", "encode_items", "item_codes_frame", "total_bits",
    "ResidualKMeansConfig", "ResidualKMeansQuantizer", "nearest_code",
]
