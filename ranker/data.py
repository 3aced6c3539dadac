"""Where training batches come from: events held in memory, or a parquet file streamed
chunk by chunk with bounded memory. Both cut the data into equal per-rank shards (every
rank of a distributed run must take the same number of steps) and derive every random
choice from ``(seed, epoch, step)``, so a resumed run replays exactly the batches an
uninterrupted run would have seen.

    parquet row groups   [g0][g1][g2][g3][g4][g5] ...
    epoch e, seeded      [g4][g1][g5][g0][g3][g2]      (group order shuffled)
    rank 0 / 2           [g4]    [g5]    [g3]          (every world_size-th group)
    rank 1 / 2               [g1]    [g0]    [g2]
    within a rank        rows shuffled inside a buffer of groups -> batches of B
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ranker.features import EncodedEvents, FeatureEncoder

Batch = tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def item_id_drops(seed: int, epoch: int, step: int, shard: "Shard", n: int,
                  rate: float) -> torch.Tensor | None:
    """Which of a rank's ``n`` examples at this step get the out-of-vocabulary item id.

    The draws are made for the whole global batch from ``(seed, epoch, step)`` and rank r
    takes positions r, r + world_size, ...: a resumed run draws the same masks, and a
    run on N processes drops the same examples as one process given the same batch.
    """
    if rate <= 0:
        return None
    generator = torch.Generator().manual_seed(int(_rng(seed, epoch, step, 0).integers(2**62)))
    draws = torch.rand(n * shard.world_size, generator=generator)
    return draws[shard.rank::shard.world_size][:n] < rate


def rank_batch_size(batch_size: int, shard: "Shard") -> int:
    """Examples per rank per step: ``batch_size`` is the global batch of one optimizer
    step, so a run's learning dynamics do not depend on how many processes share it."""
    if batch_size % shard.world_size:
        raise ValueError(f"batch_size {batch_size} is the global batch of one step and must "
                         f"divide evenly over {shard.world_size} processes")
    return batch_size // shard.world_size


@dataclass
class Shard:
    """This process' part of the data: rank ``rank`` of ``world_size``."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of {self.world_size}")


class InMemoryBatches:
    """Training batches over ``EncodedEvents`` held in memory.

    Each epoch draws one seeded permutation of all rows and cuts it into global batches
    of ``batch_size``; rank r takes every ``world_size``-th row of each. So N processes
    train on exactly the batches (and item-id dropout draws) of one process, and
    their test AUCs differ only by floating-point reduction order.
    """

    def __init__(self, features: FeatureEncoder, events: EncodedEvents, *, batch_size: int,
                 seed: int, shard: Shard = Shard()) -> None:
        self.features, self.events = features, events
        self.batch_size, self.seed, self.shard = batch_size, seed, shard
        self._rank_batch = rank_batch_size(batch_size, shard)
        self._rows_per_rank = len(events) // shard.world_size

    def num_batches(self, epoch: int) -> int:
        return -(-self._rows_per_rank // self._rank_batch)

    def batches(self, epoch: int, *, item_id_dropout: float = 0.0, start: int = 0
                ) -> Iterator[Batch]:
        """Batches of one epoch, from step ``start`` on."""
        order = _rng(self.seed, epoch).permutation(len(self.events))
        mine = order[self.shard.rank::self.shard.world_size][:self._rows_per_rank]
        b = self._rank_batch
        for step in range(start, self.num_batches(epoch)):
            index = torch.from_numpy(mine[step * b:(step + 1) * b])
            yield self.features.batch(self.events, index, drop_item_id=item_id_drops(
                self.seed, epoch, step, self.shard, len(index), item_id_dropout))


class ParquetBatches:
    """Training batches streamed from a parquet file of contract events.

    Memory is bounded by ``buffer_groups`` row groups (write the file with
    ``mmdata.write_split``, which shuffles training rows and sets the row-group size).
    Row groups (cut into slices when there are fewer than ``min_pieces_per_rank`` per
    rank) are dealt to ranks round-robin in a seeded per-epoch order; rows are shuffled
    within a buffer of ``buffer_groups`` of them and cut into full batches of
    ``batch_size / world_size`` (``batch_size`` is the global batch of one step).
    The rows of a buffer that do not fill a batch are left out that epoch (fewer than
    ``batch_size`` per buffer, a different few each epoch), and every rank stops after
    the same ``num_batches(epoch)`` steps.
    """

    def __init__(self, path: str | Path, features: FeatureEncoder, *, batch_size: int,
                 seed: int, shard: Shard = Shard(), buffer_groups: int = 4,
                 min_pieces_per_rank: int = 16) -> None:
        self.path, self.features = Path(path), features
        self.batch_size, self.seed, self.shard = batch_size, seed, shard
        self._rank_batch = rank_batch_size(batch_size, shard)
        self.buffer_groups = buffer_groups
        meta = pq.ParquetFile(self.path).metadata
        group_rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.num_rows = int(sum(group_rows))
        # The unit dealt to ranks is a piece: a row group, or a slice of one when the file
        # has too few groups to give every rank ``min_pieces_per_rank`` of them.
        piece = max(1, -(-self.num_rows // (shard.world_size * min_pieces_per_rank)))
        starts, rows, offset = [], [], 0
        for n in group_rows:
            k = max(1, -(-n // piece))
            cuts = np.linspace(0, n, k + 1).astype(np.int64)
            starts += (offset + cuts[:-1]).tolist()
            rows += np.diff(cuts).tolist()
            offset += n
        self._piece_start = np.array(starts, dtype=np.int64)
        self._piece_rows = np.array(rows, dtype=np.int64)  # (n_pieces,)
        if self.num_batches(0) == 0:
            raise ValueError(f"{self.path}: {self.num_rows} training events give rank(s) no full "
                             f"batch of {self._rank_batch} with {shard.world_size} processes")

    def _buffers(self, epoch: int, rank: int) -> list[np.ndarray]:
        order = _rng(self.seed, epoch).permutation(len(self._piece_rows))
        mine = order[rank::self.shard.world_size]
        return [mine[i:i + self.buffer_groups] for i in range(0, len(mine), self.buffer_groups)]

    def _full_batches(self, buffer: np.ndarray) -> int:
        return int(self._piece_rows[buffer].sum()) // self._rank_batch

    def num_batches(self, epoch: int) -> int:
        return min(sum(self._full_batches(b) for b in self._buffers(epoch, r))
                   for r in range(self.shard.world_size))

    def read_pieces(self, pieces: np.ndarray) -> pl.DataFrame:
        """The rows of the given pieces (a lazy scan sliced to each)."""
        scan = pl.scan_parquet(self.path)
        return pl.concat([scan.slice(int(self._piece_start[g]), int(self._piece_rows[g])).collect()
                          for g in pieces])

    def batches(self, epoch: int, *, item_id_dropout: float = 0.0, start: int = 0
                ) -> Iterator[Batch]:
        """Batches of one epoch, from step ``start`` on (buffers before it are not read)."""
        total, rank = self.num_batches(epoch), self.shard.rank
        step = 0
        for i, buffer in enumerate(self._buffers(epoch, rank)):
            n_full = self._full_batches(buffer)
            if step >= total:
                break
            if step + n_full <= start:
                step += n_full
                continue
            encoded = self.features.encode(self.read_pieces(buffer), where=str(self.path))
            perm = torch.from_numpy(_rng(self.seed, epoch, rank, i).permutation(len(encoded)))
            for b in range(n_full):
                if step >= total:
                    break
                if step >= start:
                    index = perm[b * self._rank_batch:(b + 1) * self._rank_batch]
                    yield self.features.batch(encoded, index, drop_item_id=item_id_drops(
                        self.seed, epoch, step, self.shard, len(index), item_id_dropout))
                step += 1
