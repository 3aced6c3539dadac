"""The ``Encoder`` interface: content in, one float32 vector per item out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np


class Encoder(ABC):
    """Maps a batch of one modality's inputs to embeddings.

    Subclasses set ``modality`` ("text" or "image"), ``dim`` and ``name``, and
    implement :meth:`encode`. Outputs need not be normalised: the featurizer
    normalises each modality before combining them.
    """

    modality: str
    dim: int
    name: str

    @abstractmethod
    def encode(self, inputs: Sequence[Any]) -> np.ndarray:
        """Args: inputs: n texts (str) or n images (path, PIL image or HxWx3 uint8 array).

        Returns: (n, dim) float32.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, modality={self.modality}, dim={self.dim})"
