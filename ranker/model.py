"""The CTR model: TorchRec ``EmbeddingBagCollection`` under a DLRM or DCN-v2 interaction."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.models.dlrm import (DLRM, DLRM_DCN, InteractionArch, InteractionDCNArch, OverArch,
                                  choose)
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ranker.features import CODE_POOLINGS, PREFIX_NGRAMS

# The fused table optimizers a RankerConfig can name; TorchRec maps each class to an fbgemm
# kernel (EXACT_ADAGRAD, EXACT_ROWWISE_ADAGRAD).
TABLE_OPTIMIZERS = {"adagrad": torch.optim.Adagrad, "rowwise_adagrad": RowWiseAdagrad}


@dataclass
class RankerConfig:
    """Architecture and optimisation of one ranker; every variant of a report shares it.
    Where each default comes from (the measurements): ``benchmarks/README.md``,
    "Where RankerConfig's defaults come from"."""

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
    # Examples per optimizer step over all processes (each of N ranks takes batch_size / N).
    batch_size: int = 512
    epochs: int = 8
    # Validations per epoch, evenly spaced (the last at its end); the best one's weights
    # are kept. A CTR model over-fits within an epoch once its ID rows start to memorise.
    validations_per_epoch: int = 4
    # Stop after this many validations without a better AUC (not counting those of the
    # table warm-up: a model is not judged before its tables have learned).
    patience: int = 4
    # Which validations count toward patience: "clearly_worse" (AUC below the best's by
    # more than two standard errors of their paired difference, DeLong, on the same
    # rows: a flat curve's noise alone does not end a run) or "not_better" (every
    # validation without a better AUC).
    patience_counts: str = "clearly_worse"
    # The weights a validation scores (and keeps, if best) are the mean of this many evenly
    # spaced snapshots of the steps since the previous validation, the last being the
    # current step (tail averaging, as SWA does): the last step alone carries the noise of
    # its last batches, which moves test AUC between seeds. Training itself goes on from
    # the last step's weights. 1 (default): the last step's weights; where a model still
    # climbs fast within a window, the mean lags behind it.
    averaged_snapshots: int = 1
    lr_dense: float = 1e-3
    lr_sparse: float = 0.02
    # Epochs at the start in which the tables hold still (learning rate 0) while the MLPs
    # learn; their Adagrad sums still gather, so the tables then start with steps scaled
    # to what their rows saw, and the dense content path is fit before ID rows memorise.
    table_warmup_epochs: int = 1
    # After the warm-up, the tables' rate in epoch e is
    # lr_sparse * lr_sparse_decay ** (e - table_warmup_epochs); in [0, 1].
    lr_sparse_decay: float = 1.0
    # Frequency-adaptive L2 on the id rows a batch looks up (user_id, item_id, cat_*, the
    # user x content cross): each row's squared norm over its training count, so every
    # row is pulled toward 0 about equally per epoch, however rare its id, rather than in
    # proportion to how often it is seen. Loss += id_l2_frequency * mean over the batch of
    # sum_f ||row_f||^2 / count_f. 0: off. Its best value grows with the events per id.
    id_l2_frequency: float = 0.0
    # Every epoch after the tables' first trained one starts with the tables (and their
    # Adagrad sums) as that epoch found them, while the MLPs train on (MEDA, arXiv
    # 2407.01607): rows that saw each example once cannot carry a second pass's
    # memorisation, and the MLPs learn from a fresh embedding space each pass.
    table_reinit_each_epoch: bool = False
    # MEDA switched on by the run itself: when patience first runs out (the model
    # over-fits its tables' repeated passes), the best step's weights come back, the
    # tables restart from their state at the start of their first trained epoch, and
    # every later epoch restarts them so (as table_reinit_each_epoch does from the
    # start); the run stops when patience runs out again, and the best step is the one
    # kept, so a run whose tables needed several passes keeps what it had.
    table_reinit_on_plateau: bool = True
    # L2 on the dense (MLP) weights.
    weight_decay: float = 1e-5
    # Share of training examples whose item id is replaced by the out-of-vocabulary
    # row, so that row is trained to stand for "an item the model has not seen".
    item_id_dropout: float = 0.1
    # Share of training examples whose user x content cross (user_code_cross) reads the
    # out-of-vocabulary user's row for that content value, as a cold user's would: the
    # cross rows then cannot carry a user's clicks alone.
    cross_id_dropout: float = 0.0
    # Code prefixes as features of their own, since a residual code means something only
    # under its prefix: "per_scale" (each scale's center, center+residual, ...), "chain"
    # (every prefix of the whole residual chain: s0, s0.s1, s0.s1.m0, ...) or "none".
    prefix_ngrams: str = "per_scale"
    # How the content IDs (codes and n-grams) meet the other features: "summed" (one
    # multi-hot feature, its embeddings summed into one interaction slot, as a residual
    # quantizer sums codewords), "per_scale" (one such feature per scale) or
    # "per_feature" (a slot per code and n-gram). Every ID value keeps rows of its own.
    code_pooling: str = "summed"
    # Initial rows of the content-ID tables: "decoded" (each ID's row starts as the mean
    # of what the codes of the training items using it decode to, projected onto the
    # decoded vectors' top principal directions: an item's summed bag starts as a
    # low-dimensional view of its content, so the user's row meets content from the first
    # step and a cold item starts where its codes' neighbours are; rows no training item
    # uses stay 0), "zeros" (a code says nothing until training shows what it means) or
    # "uniform" (TorchRec's default, like the id tables). With zero rows, the user x
    # content dot of two near-zero factors sat on a plateau for epochs on the 1M world.
    code_init: str = "decoded"
    # The id tables' (user_id, item_id, cat_*) initial rows: TorchRec's uniform
    # +-sqrt(1 / rows) times this. While the tables hold still (the warm-up) the MLPs
    # otherwise learn the random dot products of untrained rows, and that range is widest
    # for the smallest tables. Not 0: rows that all start at zero move only along the
    # dense slot, and a model without dense content would stay rank one.
    id_init_scale: float = 0.1
    # The content-ID column crossed with the user id in the ID variants (a row per user
    # and kind of content, which a user-vector . content-vector dot only approximates):
    # "none", "coarsest" (the column with the fewest values) or a column name. Off by
    # default: its rows see a few events each and memorise them on the tables' second
    # pass, while the content-ID slot (rows "decoded") and the content slot already meet
    # the user's row in a dot. A variant that feeds the dense content vector through its
    # content slot never takes it.
    user_code_cross: str = "none"
    # The tables' fused optimizer: "rowwise_adagrad" (one Adagrad sum per row, as
    # production DLRMs train their tables; cheaper per step) or "adagrad" (per element).
    table_optimizer: str = "rowwise_adagrad"
    # Give the dense content vector an interaction slot of its own: a small MLP (sizes
    # dense_arch) maps it to one more embedding-width vector that meets every ID slot in
    # the interaction (user . content: the user's taste for this kind of content), beside
    # the bottom MLP's slot, which mixes the content with the dense context.
    content_slot: bool = True
    # Standardize the dense content vector per dimension (the items' mean and std), as
    # the dense context is: a unit-norm vector's entries are about 1/sqrt(width), and
    # the bottom MLP then barely reads them.
    standardize_content: bool = True
    # Ids seen fewer times in training share the out-of-vocabulary row.
    min_id_count: int = 1
    # A content-ID value (code or n-gram) that fewer distinct training items share goes
    # to its table's out-of-vocabulary row (it names an item more than a kind of content).
    min_code_items: int = 1
    seed: int = 0
    # Intra-op threads while training: the MLPs and batches are small, so threads mostly
    # wait on each other; scale out with torchrun processes instead.
    num_threads: int = 1

    def __post_init__(self) -> None:
        if self.dense_arch[-1] != self.embedding_dim:
            raise ValueError(f"dense_arch must end in embedding_dim={self.embedding_dim}, "
                             f"got {self.dense_arch}")
        if self.over_arch[-1] != 1:
            raise ValueError(f"over_arch must end in 1 (the logit), got {self.over_arch}")
        if self.interaction not in ("dlrm", "dcn"):
            raise ValueError(f"interaction must be 'dlrm' or 'dcn', got {self.interaction!r}")
        if not 0 < self.id_init_scale <= 1:
            raise ValueError(f"id_init_scale must be in (0, 1], got {self.id_init_scale}")
        if self.code_init not in ("decoded", "zeros", "uniform"):
            raise ValueError(f"code_init must be 'decoded', 'zeros' or 'uniform', got "
                             f"{self.code_init!r}")
        if not 0 <= self.table_warmup_epochs < self.epochs:
            raise ValueError(f"table_warmup_epochs must be in [0, epochs={self.epochs}), got "
                             f"{self.table_warmup_epochs}: the tables would never learn (raise "
                             f"epochs, or set table_warmup_epochs = 0 in the [ranker] table)")
        if self.table_optimizer not in TABLE_OPTIMIZERS:
            raise ValueError(f"table_optimizer must be one of {list(TABLE_OPTIMIZERS)}, "
                             f"got {self.table_optimizer!r}")
        for name in ("item_id_dropout", "cross_id_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.lr_sparse_decay <= 1:
            raise ValueError(f"lr_sparse_decay must be in [0, 1], got {self.lr_sparse_decay}")
        if self.id_l2_frequency < 0:
            raise ValueError(f"id_l2_frequency must be >= 0, got {self.id_l2_frequency}")
        if self.patience_counts not in ("clearly_worse", "not_better"):
            raise ValueError(f"patience_counts must be 'clearly_worse' or 'not_better', "
                             f"got {self.patience_counts!r}")
        if self.averaged_snapshots < 1:
            raise ValueError(f"averaged_snapshots must be >= 1 (1: the last step's weights), "
                             f"got {self.averaged_snapshots}")
        if self.validations_per_epoch < 1 or self.patience < 1:
            raise ValueError(f"validations_per_epoch and patience must be >= 1, got "
                             f"{self.validations_per_epoch} and {self.patience}")
        if isinstance(self.prefix_ngrams, bool):  # job files of before: true / false
            self.prefix_ngrams = "per_scale" if self.prefix_ngrams else "none"
        if self.prefix_ngrams not in PREFIX_NGRAMS:
            raise ValueError(f"prefix_ngrams must be one of {PREFIX_NGRAMS}, "
                             f"got {self.prefix_ngrams!r}")
        if self.code_pooling not in CODE_POOLINGS:
            raise ValueError(f"code_pooling must be one of {CODE_POOLINGS}, "
                             f"got {self.code_pooling!r}")



def is_content_feature(name: str) -> bool:
    """The item's content IDs: a bag (``content``, ``content_<scale>``) or one
    ``code_<scale>_<level>`` / ``ngram_<scale>_<level>`` (see ``features.content_bags``)."""
    return name == "content" or name.startswith(("content_", "code_", "ngram_", "user_x_"))


class RankingModel(nn.Module):
    """One embedding table per sparse feature under TorchRec's ``DLRM`` (pairwise dot
    interaction) or ``DLRM_DCN`` (DCN-v2 low-rank cross layers); each sparse feature is
    one interaction slot.

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
                 dense_in_features: int, config: RankerConfig,
                 table_device: torch.device = torch.device("cpu"), *,
                 content_in_features: int = 0) -> None:
        super().__init__()
        tables = [
            EmbeddingBagConfig(name=f"t_{name}", embedding_dim=config.embedding_dim,
                               num_embeddings=size, feature_names=[name],
                               pooling=PoolingType.SUM)
            for name, size in zip(sparse_names, sparse_sizes)
        ]
        # table_device "meta": tables with no storage, for DMP to shard and allocate.
        ebc = EmbeddingBagCollection(tables=tables, device=table_device)
        if config.interaction == "dcn":
            self.net = DLRM_DCN(ebc, dense_in_features, config.dense_arch, config.over_arch,
                                dcn_num_layers=config.dcn_layers, dcn_low_rank_dim=config.dcn_rank)
        else:
            self.net = DLRM(ebc, dense_in_features, config.dense_arch, config.over_arch)
        # content_slot: the last content_in_features columns of the dense input (the
        # content vector) get a slot of their own, one more than the tables'.
        self.content_in_features = content_in_features if config.content_slot else 0
        self.content_arch = None
        if self.content_in_features:
            slots = len(tables) + 1
            d = config.embedding_dim
            if config.interaction == "dcn":
                self.net.inter_arch = InteractionDCNArch(slots, LowRankCrossNet(
                    (slots + 1) * d, config.dcn_layers, config.dcn_rank))
                self.net.over_arch = OverArch((slots + 1) * d, config.over_arch)
            else:
                self.net.inter_arch = InteractionArch(slots)
                self.net.over_arch = OverArch(d + choose(slots, 2) + slots, config.over_arch)
            sizes = [self.content_in_features, *config.dense_arch]
            layers: list[nn.Module] = []
            for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
                layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
            self.content_arch = nn.Sequential(*layers)
        if config.id_init_scale != 1:
            with torch.no_grad():
                for name, table in ebc.embedding_bags.items():
                    if not is_content_feature(name.removeprefix("t_")):
                        table.weight.mul_(config.id_init_scale)
        if config.code_init in ("zeros", "decoded"):  # "decoded" rows are set by .of
            with torch.no_grad():
                for name, table in ebc.embedding_bags.items():
                    if is_content_feature(name.removeprefix("t_")):
                        table.weight.zero_()

    @classmethod
    def of(cls, features, config: RankerConfig,
           table_device: torch.device = torch.device("cpu")) -> "RankingModel":
        """The model for a fitted ``ranker.features.FeatureEncoder``: its tables, its
        dense input, and its content vector's slot (``config.content_slot``)."""
        model = cls(features.sparse_names, features.sparse_sizes, features.dense_in_features,
                    config, table_device, content_in_features=features.content_in_features)
        # code_init "decoded": the content-ID rows start from what the training items'
        # codes decode to (a trainer's encoder carries them; a loaded bundle's does not,
        # and its weights replace these anyway).
        if (config.code_init == "decoded" and features.bag_names
                and features.content.decoded is not None and table_device.type != "meta"):
            tables = model.net.sparse_arch.embedding_bag_collection.embedding_bags
            with torch.no_grad():
                for name, rows in features.decoded_rows(config.embedding_dim).items():
                    tables[f"t_{name}"].weight.copy_(torch.from_numpy(rows))
        return model

    def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor, *, with_embeddings: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B,); with ``with_embeddings`` also the pooled embeddings (B, F, D), F
        in table order, for a regulariser on the rows a batch looked up. DLRM's forward,
        spelled out so the embeddings come out through DMP's wrapper."""
        net = self.net
        embedded = net.sparse_arch(kjt)  # (B, F, D)
        if self.content_arch is not None:
            content = self.content_arch(dense[:, -self.content_in_features:])  # (B, D)
            embedded = torch.cat([embedded, content.unsqueeze(1)], dim=1)
        interactions = net.inter_arch(dense_features=net.dense_arch(dense),
                                      sparse_features=embedded)
        logits = net.over_arch(interactions).squeeze(-1)  # (B,)
        return (logits, embedded) if with_embeddings else logits

    def sparse_parameters(self) -> list[nn.Parameter]:
        return list(self.net.sparse_arch.parameters())
