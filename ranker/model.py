"""The CTR model: TorchRec ``EmbeddingBagCollection`` under a DLRM or DCN-v2 interaction."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class RankerConfig:
    # Width of every embedding table (DLRM's dot interaction needs one width).
    embedding_dim: int = 16
    # Bottom MLP over the dense input; its last size must equal embedding_dim.
    dense_arch: list[int] = field(default_factory=lambda: [128, 16])
    # Top MLP over the interactions; ends in 1 (the logit).
    over_arch: list[int] = field(default_factory=lambda: [128, 64, 1])
    # "dlrm" (pairwise dot products) or "dcn" (DCN-v2 low-rank cross layers).
    interaction: str = "dlrm"
    dcn_layers: int = 2
    dcn_rank: int = 16
    batch_size: int = 512
    epochs: int = 8
    # Stop after this many epochs without a better validation AUC.
    patience: int = 2
    lr_dense: float = 1e-3
    lr_sparse: float = 0.02
    # L2 on the dense (MLP) weights.
    weight_decay: float = 1e-5
    # Share of training examples whose item id is replaced by the out-of-vocabulary
    # row, so that row is trained to stand for "an item the model has not seen".
    item_id_dropout: float = 0.1
    # Also feed each scale's code prefixes (center, center+residual) as features. On
    # MovieLens with MmDict's cascade codes: ids AUC 0.7027 vs 0.6977 without (3 seeds).
    prefix_ngrams: bool = True
    # Ids seen fewer times in training share the out-of-vocabulary row.
    min_id_count: int = 1
    seed: int = 0
    # Intra-op threads while training. The MLPs and batches are small, so threads mostly
    # wait on each other (measured: 1 thread ran ~10x faster than 2 on a busy 2-core
    # machine); scale out with torchrun processes instead.
    num_threads: int = 1

    def __post_init__(self) -> None:
        if self.dense_arch[-1] != self.embedding_dim:
            raise ValueError(f"dense_arch must end in embedding_dim={self.embedding_dim}, "
                             f"got {self.dense_arch}")
        if self.over_arch[-1] != 1:
            raise ValueError(f"over_arch must end in 1 (the logit), got {self.over_arch}")
        if self.interaction not in ("dlrm", "dcn"):
            raise ValueError(f"interaction must be 'dlrm' or 'dcn', got {self.interaction!r}")


class RankingModel(nn.Module):
    """One embedding table per sparse feature, a DLRM-family network on top.

    Args:
        sparse_names: feature names, one table each (``t_<name>``).
        sparse_sizes: rows per table.
        dense_in_features: width of the dense input.
        config: the architecture.

    Example::

        model = RankingModel(["user_id", "item_id"], [944, 1683], 1, RankerConfig())
        logits = model(dense, kjt)  # (B,)
    """

    def __init__(self, sparse_names: list[str], sparse_sizes: list[int],
                 dense_in_features: int, config: RankerConfig) -> None:
        super().__init__()
        tables = [
            EmbeddingBagConfig(name=f"t_{name}", embedding_dim=config.embedding_dim,
                               num_embeddings=size, feature_names=[name],
                               pooling=PoolingType.SUM)
            for name, size in zip(sparse_names, sparse_sizes)
        ]
        ebc = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
        if config.interaction == "dcn":
            self.net = DLRM_DCN(ebc, dense_in_features=dense_in_features,
                                dense_arch_layer_sizes=config.dense_arch,
                                over_arch_layer_sizes=config.over_arch,
                                dcn_num_layers=config.dcn_layers,
                                dcn_low_rank_dim=config.dcn_rank)
        else:
            self.net = DLRM(ebc, dense_in_features=dense_in_features,
                            dense_arch_layer_sizes=config.dense_arch,
                            over_arch_layer_sizes=config.over_arch)

    def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.net(dense_features=dense, sparse_features=kjt).squeeze(-1)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return list(self.net.sparse_arch.parameters())

    def dense_parameters(self) -> list[nn.Parameter]:
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]
