"""DLRM's pairwise dot interaction, computed on the pairs only.

TorchRec's ``InteractionArch`` forms every (F + 1) x (F + 1) dot product with one
``bmm`` and keeps the upper triangle. On CPU at ranking batch sizes the ``bmm`` is
many tiny matrix products (one per example) and dominates the interaction's time, and
its cost grows with the square of the slot count, so every sparse feature a model adds
pays for it. Gathering the two sides of each pair and summing their product does the
same arithmetic without the per-example products and without the lower triangle:
forward and backward together ran in 0.5-0.6x the ``bmm``'s time for 5 and 7 slots at
batch 512 on one CPU thread (ad-hoc timing, benchmarks/README.md).
"""

from __future__ import annotations

import torch
from torchrec.models.dlrm import InteractionArch


class PairwiseDotInteraction(InteractionArch):
    """``InteractionArch`` with the same output, its pairs in the same order:
    ``[dense, <v_i, v_j> for i < j]`` over ``v = [dense, sparse_1, ..., sparse_F]``.

    Args:
        num_sparse_features: F.

    Example::

        inter = PairwiseDotInteraction(num_sparse_features=2)
        out = inter(torch.rand(10, 3), torch.rand(10, 2, 3))  # (10, 3 + 3)
    """

    def forward(self, dense_features: torch.Tensor, sparse_features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            dense_features: (B, D).
            sparse_features: (B, F, D).

        Returns:
            (B, D + (F + 1) F / 2).
        """
        if self.F <= 0:
            return dense_features
        combined = torch.cat((dense_features.unsqueeze(1), sparse_features), dim=1)  # (B, F+1, D)
        left = combined.index_select(1, self.triu_indices[0])  # (B, P, D)
        right = combined.index_select(1, self.triu_indices[1])  # (B, P, D)
        return torch.cat((dense_features, (left * right).sum(-1)), dim=1)  # (B, D + P)
