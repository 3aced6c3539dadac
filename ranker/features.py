"""From contract frames to model inputs: id vocabularies, item content tables, and
``KeyedJaggedTensor`` batches.

The id features (user, item, ``cat_*``) hold one id per example. The item's content IDs
(its codes and their prefix n-grams) are grouped into bags: one multi-hot feature per
interaction slot, over one table that stacks the rows of its IDs one after the other,
so its sum pooling adds the IDs' embeddings exactly as separate tables summed into one
slot would, with one lookup per bag instead of one per ID. A batch of B examples is a
KJT laid out feature-major, each example's bag contiguous::

    keys     user_id          item_id          content (code_s_0, code_s_1 + 17)
    values   [u0  u1  u2]     [i0  i1  i2]     [a0 b0  a1 b1  a2 b2]
    lengths  [1   1   1 ]     [1   1   1 ]     [2      2      2    ]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mmdata.contracts import DataContractError, context_columns

OOV_ROW = 0


@dataclass
class IdVocab:
    """Raw ids -> embedding rows. Row 0 is shared by every id outside the vocabulary.

    The out-of-vocabulary row is trained: ids seen fewer than ``min_count`` times map
    to it, and so does a random share of item ids during training (see
    ``RankerConfig.item_id_dropout``), so a cold item never meets an untrained row.
    """

    # Sorted raw ids that own a row; id ids[k] lives in row k + 1.
    ids: np.ndarray
    # Fitted: (num_embeddings,) training occurrences per row (row 0: those of the ids
    # below min_count); None for a vocabulary loaded from a model.
    counts: np.ndarray | None = None

    @classmethod
    def fit(cls, values: np.ndarray, *, min_count: int = 1) -> "IdVocab":
        uniq, counts = np.unique(np.asarray(values, dtype=np.int64), return_counts=True)
        kept = counts >= min_count
        return cls(uniq[kept], np.concatenate([[counts[~kept].sum()], counts[kept]]))

    @property
    def num_embeddings(self) -> int:
        return len(self.ids) + 1

    def rows(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.int64)
        if not len(self.ids):
            return np.zeros(len(values), dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.ids, values), len(self.ids) - 1)
        return np.where(self.ids[pos] == values, pos + 1, OOV_ROW).astype(np.int64)


@dataclass
class ItemContent:
    """What the ranker may know of each item's content, row-aligned by ``item_ids``.

    Args:
        item_ids: (n,) int64, any order.
        vectors: (n, d) float32 dense content (the embedding, or its reconstruction), or None.
        codes: (n, c) int64 content IDs, or None.
        code_names: the c code column names.
        codebook_sizes: the c codebook sizes (embedding rows per code feature).
    """

    item_ids: np.ndarray
    vectors: np.ndarray | None = None
    codes: np.ndarray | None = None
    code_names: list[str] = field(default_factory=list)
    codebook_sizes: list[int] = field(default_factory=list)
    # (n, d) float32 what each item's codes decode to (RankerConfig.code_init "decoded"),
    # or None.
    decoded: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.item_ids = np.asarray(self.item_ids, dtype=np.int64)
        self._order = np.argsort(self.item_ids, kind="stable")
        self._sorted = self.item_ids[self._order]

    def find(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, found)``: each item id's row, and whether it has one (the row of an
        id without content is meaningless)."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._sorted, item_ids), max(len(self._sorted) - 1, 0))
        found = self._sorted[pos] == item_ids if len(self._sorted) else np.zeros(len(item_ids), bool)
        return (self._order[pos] if len(self._sorted) else pos), found

    def rows(self, item_ids: np.ndarray, *, where: str = "events") -> np.ndarray:
        """Row of each item id; an item without content is an error naming it."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        rows, found = self.find(item_ids)
        if not found.all():
            missing = np.unique(item_ids[~found])
            raise DataContractError(
                f"{where}: {len(missing)} item_id values have no item embedding/codes "
                f"(first: {missing[:5].tolist()})"
            )
        return rows


@dataclass
class EncodedEvents:
    """Events as model-ready tensors (one row per event).

    Args:
        sparse: (N, F) int64 embedding rows, columns in ``FeatureEncoder.sparse_names``
            order minus the code features (codes are gathered per batch from the item).
        content_row: (N,) int64 row of the event's item in the ``ItemContent`` tables.
        dense_ctx: (N, Dc) float32 standardized ``dense_*`` context.
        labels: (N,) float32.
        is_cold: (N,) bool, the item had no training event.
    """

    sparse: torch.Tensor
    content_row: torch.Tensor
    dense_ctx: torch.Tensor
    labels: torch.Tensor
    is_cold: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ContentColumns:
    """Items' content IDs as the model reads them, one row per item (see
    ``FeatureEncoder.content_features``).

    Args:
        bags: (n, K) int64 rows in the bags' stacked tables, bag after bag (K: the
            content-ID columns, codes then n-grams, over all bags).
        cross: (n,) int64 the user-crossed column's value row, or None without a cross.
    """

    bags: torch.Tensor
    cross: torch.Tensor | None = None

    def __getitem__(self, rows: torch.Tensor | slice) -> "ContentColumns":
        return ContentColumns(self.bags[rows], None if self.cross is None else self.cross[rows])


NGRAM_BUCKETS = 1 << 20


# How the content IDs' prefixes become features of their own (RankerConfig.prefix_ngrams).
PREFIX_NGRAMS = ("none", "per_scale", "chain")


def _bucket(keys: np.ndarray) -> np.ndarray:
    """Exact prefix keys -> rows of an ``NGRAM_BUCKETS`` table (Fibonacci hashing: the
    top bits of key x 2^64/phi, so every code of the prefix moves the row)."""
    mixed = keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # wraps mod 2^64
    return (mixed >> np.uint64(64 - NGRAM_BUCKETS.bit_length() + 1)).astype(np.int64)


def prefix_ngram_codes(codes: np.ndarray, code_names: list[str], sizes: list[int],
                       mode: str = "per_scale") -> tuple[list[str], list[int], np.ndarray]:
    """Prefix n-grams of the codes, each as one id (mixed radix; hashed into
    ``NGRAM_BUCKETS`` rows when the product of the sizes is larger):

    * ``per_scale``: for ``code_<scale>_<l>`` with l >= 1, the tuple (code_<scale>_0, ...,
      code_<scale>_l), named ``ngram_<scale>_<l>``;
    * ``chain``: along the whole residual chain, every prefix (c_0, ..., c_j) for j >= 1 of
      the codes in column order (s0, s0·s1, s0·s1·m0, ...: a fine code means something
      only under all that came before it, as Meta's prefix-ngram semantic IDs are read),
      named ``ngram_<scale>_<l>`` after its last code.

    Returns ``(names, sizes, ngrams (n, g) int64)``.
    """
    if mode not in PREFIX_NGRAMS:
        raise ValueError(f"prefix n-grams {mode!r}: choose from {PREFIX_NGRAMS}")
    names, out_sizes, columns = [], [], []
    chains: dict[str, list[int]] = {}
    for j, name in enumerate(code_names):
        scale = name.rsplit("_", 1)[0].removeprefix("code_")
        chains.setdefault("chain" if mode == "chain" else scale, []).append(j)
    if mode == "none":
        chains = {}
    for cols in chains.values():
        key = codes[:, cols[0]].astype(np.int64)
        size = sizes[cols[0]]
        for j in cols[1:]:
            if size * sizes[j] >= 1 << 62:  # keep the key in int64: its bucket stands for it
                key, size = _bucket(key), NGRAM_BUCKETS
            key = key * sizes[j] + codes[:, j]  # exact
            size *= sizes[j]
            names.append(f"ngram_{code_names[j].removeprefix('code_')}")
            out_sizes.append(min(size, NGRAM_BUCKETS))
            columns.append(key.copy() if size <= NGRAM_BUCKETS else _bucket(key))
    ngrams = np.stack(columns, axis=1) if columns else np.zeros((len(codes), 0), np.int64)
    return names, out_sizes, ngrams


def _prefix_mode(value: str | bool) -> str:
    """A ``PREFIX_NGRAMS`` mode; True / False (the flag of before) read as per_scale / none."""
    mode = {True: "per_scale", False: "none"}.get(value, value) if isinstance(value, bool) else value
    if mode not in PREFIX_NGRAMS:
        raise ValueError(f"prefix_ngrams must be one of {PREFIX_NGRAMS}, got {value!r}")
    return mode


CODE_POOLINGS = ("per_feature", "per_scale", "summed")


def content_bags(code_names: list[str], pooling: str) -> list[tuple[str, list[int]]]:
    """``[(feature name, column indices)]``: which content-ID columns (``code_<scale>_<l>``,
    ``ngram_<scale>_<l>``) share one multi-hot feature. ``summed``: all of them in one
    ``content`` bag; ``per_scale``: one ``content_<scale>`` bag per scale; ``per_feature``:
    each column a feature of its own.

    >>> content_bags(["code_s_0", "code_s_1", "code_m_0", "ngram_s_1"], "per_scale")
    [('content_s', [0, 1, 3]), ('content_m', [2])]
    """
    if pooling not in CODE_POOLINGS:
        raise ValueError(f"code_pooling must be one of {CODE_POOLINGS}, got {pooling!r}")
    bags: dict[str, list[int]] = {}
    for j, name in enumerate(code_names):
        if pooling == "per_feature":
            bag = name
        elif pooling == "summed":
            bag = "content"
        else:
            bag = "content_" + name.split("_", 1)[1].rsplit("_", 1)[0]
        bags.setdefault(bag, []).append(j)
    return list(bags.items())


def resolve_user_cross(spec: str, content: ItemContent | None) -> str | None:
    """The content-ID column ``spec`` names (see ``FeatureEncoder``'s ``user_cross``), or
    None for ``none``; ``content`` None means the model has no content IDs."""
    if spec == "none":
        return None
    if content is None:
        raise ValueError(f"user_cross={spec!r} needs the content IDs (use_codes=True)")
    names, sizes = list(content.code_names), list(content.codebook_sizes)
    if spec == "coarsest":
        return names[int(np.argmin(sizes))]
    if spec not in names:
        raise ValueError(f"user_cross must be 'coarsest', 'none' or a content-ID column "
                         f"({names}), got {spec!r}")
    return spec


def kjt_from_columns(keys: list[str], columns: list[torch.Tensor],
                     ids_per_example: list[int] | None = None) -> KeyedJaggedTensor:
    """Fixed-length features -> KJT. ``columns[f]``: (B * k_f,) int64, example-major,
    where ``k_f = ids_per_example[f]`` (default 1: one id per example)."""
    per = ids_per_example or [1] * len(keys)
    batch = len(columns[0]) // per[0] if columns else 0
    values = torch.cat(columns) if columns else torch.empty(0, dtype=torch.int64)
    lengths = torch.tensor(per, dtype=torch.int32).repeat_interleave(batch)  # (F * B,)
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)


class FeatureEncoder:
    """Fitted on the training events; turns any events frame into ``EncodedEvents``
    and index batches into ``(dense, kjt, labels)``.

    Args:
        train: training events (contract frame, or a LazyFrame scan of one).
        content: the items' content tables.
        use_codes: feed the item's content IDs as sparse features.
        prefix_ngrams: also feed each scale's code prefixes as features of their own
            (``ngram_<scale>_<level>`` = the tuple of that scale's codes up to the level),
            so a residual code is read together with the center it refines.
        use_dense_content: feed the item's content vector as dense input.
        code_pooling: how the content IDs are grouped into features (``content_bags``):
            ``summed`` (one bag, the default), ``per_scale`` or ``per_feature``.
        user_cross: the content-ID column to cross with the user id: a column name (e.g.
            ``code_s_0``), ``coarsest`` (the quantizer's column with the fewest values,
            the first on ties) or ``none``. It becomes the feature ``user_x_<column>``
            with one row per (user, value): a user's own click rate on a kind of content,
            which a dot product of a user vector and a content vector only approximates.
        min_count: ids seen fewer times in training share the out-of-vocabulary row.
        min_code_items: a content-ID value (code or n-gram) shared by fewer distinct
            training items than this goes to its table's out-of-vocabulary row: such a
            value names an item more than a kind of content, and would carry that item's
            own click effects to the cold items that share it. 1 keeps every value.
    """

    @classmethod
    def from_config(cls, train: pl.DataFrame | pl.LazyFrame, content: ItemContent, config, *,
                    use_codes: bool, use_dense_content: bool) -> "FeatureEncoder":
        """The encoder a ``RankerConfig`` asks for (id counts, n-grams, code pruning, and
        the user cross only where no content slot carries the dense vector)."""
        content_slot = use_dense_content and config.content_slot
        return cls(train, content, use_codes=use_codes, use_dense_content=use_dense_content,
                   min_count=config.min_id_count, prefix_ngrams=config.prefix_ngrams,
                   min_code_items=config.min_code_items, code_pooling=config.code_pooling,
                   user_cross=config.user_code_cross if use_codes and not content_slot else "none",
                   standardize_content=config.standardize_content)

    def __init__(self, train: pl.DataFrame | pl.LazyFrame, content: ItemContent, *, use_codes: bool,
                 use_dense_content: bool, min_count: int = 1, prefix_ngrams: str | bool = "none",
                 min_code_items: int = 1, code_pooling: str = "summed",
                 user_cross: str = "none", standardize_content: bool = False) -> None:
        content_bags([], code_pooling)  # a bad name fails here, before any work
        if use_codes and content.codes is None:
            raise ValueError("use_codes=True needs ItemContent.codes")
        if use_dense_content and content.vectors is None:
            raise ValueError("use_dense_content=True needs ItemContent.vectors")
        self.use_codes = use_codes
        self.use_dense_content = use_dense_content
        self.prefix_ngrams = _prefix_mode(prefix_ngrams)
        self.code_pooling = code_pooling
        self.user_cross = resolve_user_cross(user_cross, content if use_codes else None)
        # A LazyFrame (e.g. a parquet scan too big for memory) is read one column at a time.
        schema = train.collect_schema() if isinstance(train, pl.LazyFrame) else train.schema
        self.cat_names, self.dense_names = context_columns(schema)

        def column(name: str) -> np.ndarray:
            if isinstance(train, pl.LazyFrame):
                return train.select(name).collect()[name].to_numpy()
            return train[name].to_numpy()

        self.vocabs = {name: IdVocab.fit(column(name), min_count=min_count)
                       for name in ["user_id", "item_id", *self.cat_names]}
        if self.dense_names:
            stats = train.lazy().select(
                [pl.col(c).cast(pl.Float64).mean().alias(f"m_{c}") for c in self.dense_names]
                + [pl.col(c).cast(pl.Float64).std(ddof=0).alias(f"s_{c}") for c in self.dense_names]
            ).collect()
            self.dense_mean = np.array([stats[f"m_{c}"][0] for c in self.dense_names], np.float32)
            self.dense_std = np.maximum(
                np.array([stats[f"s_{c}"][0] for c in self.dense_names]), 1e-6).astype(np.float32)
        # Per-dimension mean and std of the items' content vectors: a unit-norm d-wide
        # vector has entries of about 1/sqrt(d), next to standardized dense context.
        self.content_mean = self.content_std = None
        if use_dense_content and standardize_content:
            self.content_mean = content.vectors.mean(axis=0).astype(np.float32)
            self.content_std = np.maximum(content.vectors.std(axis=0), 1e-6).astype(np.float32)
        self.code_vocabs: dict[str, IdVocab] = {}
        if use_codes and min_code_items > 1:
            names, _, ids = self._content_ids(content.codes, content.code_names,
                                              content.codebook_sizes)
            rows, found = content.find(self.vocabs["item_id"].ids)
            trained = np.unique(rows[found])  # content rows of the items training saw
            self.code_vocabs = {name: IdVocab.fit(ids[trained, j], min_count=min_code_items)
                                for j, name in enumerate(names)}
        self._set_content(content)
        # Training events per row of each one-id feature (ids and the user cross), for
        # RankerConfig.id_l2_frequency; the shared out-of-vocabulary rows count 0 (they
        # stand for every unseen id, and are not the rows that memorise).
        self.id_row_counts = {name: np.concatenate([[0], vocab.counts[1:]])
                              for name, vocab in self.vocabs.items()}
        if self.user_cross is not None:
            users = self.vocabs["user_id"].rows(column("user_id"))
            rows, found = content.find(column("item_id"))
            cross = self._cross_rows(torch.from_numpy(users[found]),
                                     self._content_columns.cross[rows[found]]).numpy()
            counts = np.bincount(cross, minlength=self.cross_sizes[0])
            counts[:self._cross_values] = 0  # (out-of-vocabulary user, value)
            self.id_row_counts[self.cross_names[0]] = counts

    def _content_ids(self, codes: np.ndarray, code_names: list[str], codebook_sizes: list[int]
                     ) -> tuple[list[str], list[int], np.ndarray]:
        """Content-ID column names, their value counts and raw values (n, C): the codes
        (n, c), then each scale's prefix n-grams when the encoder reads them."""
        names, sizes = list(code_names), list(codebook_sizes)
        if self.prefix_ngrams != "none":
            ngram_names, ngram_sizes, ngrams = prefix_ngram_codes(codes, names, sizes,
                                                                  self.prefix_ngrams)
            names, sizes = names + ngram_names, sizes + ngram_sizes
            codes = np.concatenate([codes, ngrams], axis=1)
        return names, sizes, codes

    def _set_content(self, content: ItemContent) -> None:
        """Lays the sparse features out and precomputes the known items' content
        columns (``content_features`` of every row of ``content``)."""
        self.content = content
        self.id_names = list(self.vocabs)  # user_id, item_id, cat_*
        # The content IDs, one column each (codes, then n-grams), and their table sizes.
        self.code_names, self.code_sizes = [], []
        self.bag_names, self.bag_sizes, self._bag_lengths = [], [], []
        self._bag_layout: list[tuple[list[int], np.ndarray]] = []  # (columns, table offsets)
        if self.use_codes:
            self.code_names, self.code_sizes, _ = self._content_ids(
                np.zeros((0, len(content.code_names)), np.int64), content.code_names,
                content.codebook_sizes)
            if self.code_vocabs:  # pruned: rare values share row 0
                self.code_sizes = [self.code_vocabs[n].num_embeddings for n in self.code_names]
            for name, cols in content_bags(self.code_names, self.code_pooling):
                sizes = np.array([self.code_sizes[j] for j in cols], dtype=np.int64)
                offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # each ID's rows
                self._bag_layout.append((cols, offsets))
                self.bag_names.append(name)
                self.bag_sizes.append(int(sizes.sum()))
                self._bag_lengths.append(len(cols))
        # The (user, content ID) cross: row = user row * values + value (hashed into
        # NGRAM_BUCKETS rows past that).
        self.cross_names, self.cross_sizes = [], []
        if self.user_cross is not None:
            self._cross_column = self.code_names.index(self.user_cross)
            self._cross_values = self.code_sizes[self._cross_column]
            self.cross_names = [f"user_x_{self.user_cross}"]
            self.cross_sizes = [min(self.vocabs["user_id"].num_embeddings * self._cross_values,
                                    NGRAM_BUCKETS)]
        self.sparse_names = self.id_names + self.bag_names + self.cross_names
        # What a batch gathers by content row.
        self._content_columns = self.content_features(content.codes) if self.use_codes else None
        self._vectors = torch.from_numpy(content.vectors) if self.use_dense_content else None

    def decoded_rows(self, width: int) -> dict[str, np.ndarray]:
        """Initial rows of each content-ID table (``RankerConfig.code_init = "decoded"``),
        from what the training items' codes decode to: those vectors standardized,
        projected onto their ``width`` top principal directions and scaled to unit mean
        norm; a row is the mean projection of the training items whose IDs use it, over
        the bag's length, so a known item's summed bag starts near its own projection and
        a cold item's near its neighbours'. Rows no training item uses stay 0."""
        decoded = self.content.decoded
        if decoded is None:
            raise ValueError("code_init 'decoded' needs ItemContent.decoded (what the codes "
                             "decode to)")
        rows, found = self.content.find(self.vocabs["item_id"].ids)
        trained = np.unique(rows[found])  # content rows of the items training saw
        x = decoded[trained].astype(np.float64)
        x = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-6)
        _, _, vt = np.linalg.svd(x[:: max(1, len(x) // 20_000)], full_matrices=False)
        proj = x @ vt[:width].T  # (n, <= width)
        proj /= np.sqrt(max((proj ** 2).sum(axis=1).mean(), 1e-12))
        bags = self._content_columns.bags.numpy()[trained]
        out, start = {}, 0
        for name, size, length in zip(self.bag_names, self.bag_sizes, self._bag_lengths):
            total, count = np.zeros((size, width)), np.zeros(size)
            for k in range(start, start + length):
                np.add.at(total[:, :proj.shape[1]], bags[:, k], proj)
                np.add.at(count, bags[:, k], 1)
            start += length
            out[name] = (total / np.maximum(count, 1)[:, None] / length).astype(np.float32)
        return out

    def content_features(self, codes: np.ndarray) -> ContentColumns:
        """Items' content IDs as the model reads them, from their raw codes: prefix
        n-grams added, rare values pruned to the out-of-vocabulary row, each bag's IDs
        offset into its stacked table, and the user-crossed column's value row. It
        builds the known items' table offline and a brand-new ad's row online, so the
        two cannot drift. Needs ``use_codes``.

        Args:
            codes: (n, c) int64 raw code values, columns in ``content.code_names`` order
                (what the quantizer's ``encode`` returns).

        Returns:
            ``ContentColumns``: bags (n, K) int64, cross (n,) int64 or None.

        Example::

            columns = features.content_features(quantizer.encode(new_embeddings))
            dense, kjt = features.model_inputs(ids, dense_ctx, columns)
        """
        _, _, ids = self._content_ids(np.asarray(codes, dtype=np.int64), self.content.code_names,
                                      self.content.codebook_sizes)  # (n, C) raw values
        if self.code_vocabs:
            ids = np.stack([self.code_vocabs[name].rows(ids[:, j])
                            for j, name in enumerate(self.code_names)], axis=1)  # (n, C) rows
        bags = [ids[:, cols] + offsets for cols, offsets in self._bag_layout]
        bags = np.concatenate(bags, axis=1) if bags else np.zeros((len(ids), 0), np.int64)
        cross = None
        if self.user_cross is not None:
            cross = torch.from_numpy(np.ascontiguousarray(ids[:, self._cross_column]))
        return ContentColumns(torch.from_numpy(np.ascontiguousarray(bags)), cross)

    def candidate_content(self, content_row: np.ndarray, new_codes: np.ndarray | None
                          ) -> ContentColumns:
        """Content columns of a request's candidates: a known item's precomputed row
        (``content_row >= 0``), a new item's from its codes (``content_features``).

        Args:
            content_row: (n,) int64 row in the content table, negative for a new item.
            new_codes: (m, c) int64 raw codes of the new items, in candidate order
                (None when m is 0).
        """
        new = np.flatnonzero(content_row < 0)
        known = np.flatnonzero(content_row >= 0)
        table = self._content_columns
        bags = torch.empty((len(content_row), table.bags.shape[1]), dtype=torch.int64)  # (n, K)
        cross = None if table.cross is None else torch.empty(len(content_row), dtype=torch.int64)
        parts = [(known, table[torch.from_numpy(content_row[known])])]
        if len(new):
            parts.append((new, self.content_features(new_codes)))
        for index, columns in parts:
            index = torch.from_numpy(index)
            bags[index] = columns.bags
            if cross is not None:
                cross[index] = columns.cross
        return ContentColumns(bags, cross)

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The fitted state without the item content: JSON-able settings and named arrays
        (id vocabularies, dense-context standardization), for ``from_state``."""
        meta = {"cat_names": self.cat_names, "dense_names": self.dense_names,
                "use_codes": self.use_codes, "use_dense_content": self.use_dense_content,
                "prefix_ngrams": self.prefix_ngrams, "code_vocabs": list(self.code_vocabs),
                "code_pooling": self.code_pooling, "user_cross": self.user_cross}
        arrays = {f"vocab.{name}": vocab.ids for name, vocab in self.vocabs.items()}
        arrays |= {f"code_vocab.{name}": vocab.ids for name, vocab in self.code_vocabs.items()}
        if self.dense_names:
            arrays["dense_mean"], arrays["dense_std"] = self.dense_mean, self.dense_std
        if self.content_mean is not None:
            arrays["content_mean"], arrays["content_std"] = self.content_mean, self.content_std
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays: dict[str, np.ndarray],
                   content: ItemContent) -> "FeatureEncoder":
        """The encoder that ``state()`` describes, over ``content``."""
        encoder = cls.__new__(cls)
        encoder.use_codes, encoder.use_dense_content = meta["use_codes"], meta["use_dense_content"]
        encoder.prefix_ngrams = _prefix_mode(meta.get("prefix_ngrams", "none"))
        encoder.code_pooling = meta["code_pooling"]
        encoder.user_cross = meta["user_cross"]
        encoder.cat_names, encoder.dense_names = list(meta["cat_names"]), list(meta["dense_names"])
        encoder.vocabs = {name: IdVocab(np.asarray(arrays[f"vocab.{name}"], dtype=np.int64))
                          for name in ["user_id", "item_id", *encoder.cat_names]}
        encoder.code_vocabs = {name: IdVocab(np.asarray(arrays[f"code_vocab.{name}"], dtype=np.int64))
                               for name in meta.get("code_vocabs", [])}
        if encoder.dense_names:
            encoder.dense_mean = np.asarray(arrays["dense_mean"], dtype=np.float32)
            encoder.dense_std = np.asarray(arrays["dense_std"], dtype=np.float32)
        encoder.content_mean = encoder.content_std = None
        if "content_mean" in arrays:
            encoder.content_mean = np.asarray(arrays["content_mean"], dtype=np.float32)
            encoder.content_std = np.asarray(arrays["content_std"], dtype=np.float32)
        encoder._set_content(content)
        encoder.id_row_counts = {}  # training counts: no part of a trained model
        return encoder

    @property
    def sparse_sizes(self) -> list[int]:
        """Embedding rows per sparse feature, in ``sparse_names`` order."""
        sizes = [v.num_embeddings for v in self.vocabs.values()]
        return sizes + self.bag_sizes + self.cross_sizes

    @property
    def dense_in_features(self) -> int:
        width = len(self.dense_names)
        if self.use_dense_content:
            width += self.content.vectors.shape[1]
        return max(width, 1)  # DLRM needs a dense input; a constant zero when there is none

    @property
    def content_in_features(self) -> int:
        """Width of the dense content vector at the end of the dense input (0: none)."""
        return self.content.vectors.shape[1] if self.use_dense_content else 0

    def encode(self, events: pl.DataFrame, *, where: str = "events",
               content_row: np.ndarray | None = None) -> EncodedEvents:
        """``content_row``: each event's row in the content tables (default: looked up
        by ``item_id``, every item must have one; the server passes the rows it looked
        up and builds a brand-new ad's content itself). Events to score need no
        ``label`` (it is 0 then)."""
        n = events.height
        sparse = np.stack([self.vocabs[name].rows(events[name].to_numpy())
                           for name in self.id_names], axis=1) if n else np.zeros((0, len(self.id_names)), np.int64)
        if self.dense_names:
            ctx = (events.select(self.dense_names).to_numpy().astype(np.float32)
                   - self.dense_mean) / self.dense_std
        else:
            ctx = np.zeros((n, 0), dtype=np.float32)
        is_cold = events["is_cold"].to_numpy() if "is_cold" in events.columns \
            else sparse[:, 1] == OOV_ROW
        return EncodedEvents(
            sparse=torch.from_numpy(np.ascontiguousarray(sparse)),
            content_row=torch.from_numpy(
                self.content.rows(events["item_id"].to_numpy(), where=where)
                if content_row is None else np.asarray(content_row, dtype=np.int64)),
            dense_ctx=torch.from_numpy(np.ascontiguousarray(ctx)),
            labels=torch.from_numpy(events["label"].to_numpy().astype(np.float32)
                                    if "label" in events.columns else np.zeros(n, np.float32)),
            is_cold=torch.from_numpy(np.asarray(is_cold, dtype=bool)),
        )

    def batch(self, events: EncodedEvents, index: torch.Tensor | slice, *,
              drop_item_id: torch.Tensor | None = None, drop_cross_id: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
        """Gathers rows ``index`` (or all rows, ``slice(None)``, without a copy) into
        ``(dense (B, Dd), kjt, labels (B,))``, the content from the known items' tables.
        ``drop_item_id``: (B,) bool, examples whose item id becomes the OOV row.
        ``drop_cross_id``: (B,) bool, examples whose user x content cross becomes the
        out-of-vocabulary user's row for that content value (what a cold user reads)."""
        ids = events.sparse[index]  # (B, F_ids)
        if drop_item_id is not None:
            ids = ids.clone()
            ids[drop_item_id, 1] = OOV_ROW  # column 1 is item_id
        content_row = events.content_row[index]
        content = None if self._content_columns is None else self._content_columns[content_row]
        vectors = None if self._vectors is None else self._vectors[content_row]
        cross_users = None
        if drop_cross_id is not None and self.user_cross is not None:
            cross_users = ids[:, 0].masked_fill(drop_cross_id, OOV_ROW)  # column 0 is user_id
        dense, kjt = self.model_inputs(ids, events.dense_ctx[index], content, vectors,
                                       cross_users=cross_users)
        return dense, kjt, events.labels[index]

    def _cross_rows(self, users: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Rows of the user x content cross: (user row, value row) -> its table row."""
        return (users * self._cross_values + values) % NGRAM_BUCKETS

    def model_inputs(self, ids: torch.Tensor, dense_ctx: torch.Tensor,
                     content: ContentColumns | None = None, vectors: torch.Tensor | None = None,
                     *, cross_users: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, KeyedJaggedTensor]:
        """One batch's model inputs from its row-aligned parts: ``batch`` gathers them
        from the tables, the server builds a request's content with ``content_features``.

        Args:
            ids: (B, F_ids) int64 embedding rows, columns in ``id_names`` order.
            dense_ctx: (B, Dc) float32 standardized ``dense_*`` context.
            content: (B rows) the items' ``content_features``; given iff ``use_codes``.
            vectors: (B, D) float32 dense content; given iff ``use_dense_content``.
            cross_users: (B,) int64 user rows the user x content cross reads (default:
                the ids' user_id column).

        Returns:
            ``(dense (B, Dd), kjt)``, the KJT's keys in ``sparse_names`` order.
        """
        columns = list(ids.T)
        if content is not None:
            start = 0
            for k in self._bag_lengths:
                columns.append(content.bags[:, start:start + k].reshape(-1))  # (B * k,)
                start += k
            if content.cross is not None:  # column 0 is user_id
                users = ids[:, 0] if cross_users is None else cross_users
                columns.append(self._cross_rows(users, content.cross))
        if vectors is not None and self.content_mean is not None:
            vectors = (vectors - torch.from_numpy(self.content_mean)) / torch.from_numpy(self.content_std)
        dense = torch.cat([dense_ctx] if vectors is None else [dense_ctx, vectors], dim=1)
        if dense.shape[1] == 0:
            dense = torch.zeros(len(ids), 1)
        kjt = kjt_from_columns(self.sparse_names, [c.contiguous() for c in columns],
                               [1] * len(self.id_names) + self._bag_lengths
                               + [1] * len(self.cross_names))
        return dense, kjt
