"""Content -> embedding: encoders for ad text and images, and the item featurizer."""

from featurizer.encoder import Encoder
from featurizer.featurize import embed_items
from featurizer.image import EfficientNetLite0Encoder, HFVisionEncoder
from featurizer.precomputed import PrecomputedEncoder
from featurizer.text import HFTextEncoder, minilm_text_encoder

__all__ = [
    "Encoder", "embed_items", "EfficientNetLite0Encoder", "HFVisionEncoder",
    "PrecomputedEncoder", "HFTextEncoder", "minilm_text_encoder",
]
