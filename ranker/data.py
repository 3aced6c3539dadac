"""Where training batches come from: events held in memory, or a parquet file streamed
chunk by chunk with bounded memory. Both give N processes the global batches of one
process, rank r taking its own part of each (so every rank takes the same number of
steps, and the number of processes does not change the model), and derive every random
choice from ``(seed, epoch, step)``, so a resumed run replays exactly the batches an
uninterrupted run would have seen.

    parquet row groups   [g0][g1][g2][g3][g4][g5][g6][g7] ...
    epoch e, seeded      [g4][g1][g5][g0][g3][g2][g7][g6]  (group order shuffled)
    4 data streams       s0: g4 g3   s1: g1 g2   s2: g5 g7   s3: g0 g6
    global batch k       B/4 rows of s0 | s1 | s2 | s3   (rows shuffled per buffer)
    rank 0 / 2 reads     s0, s2        rank 1 / 2 reads  s1, s3
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
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


# The independent draws of each kind of id dropout (the key of its random stream).
ITEM_ID_DRAWS, CROSS_ID_DRAWS = 0, 1


def id_drops_at(seed: int, epoch: int, step: int, global_batch: int,
                positions: torch.Tensor, rate: float, draws: int = ITEM_ID_DRAWS
                ) -> torch.Tensor | None:
    """Which examples at this step get an id dropped (``draws``: the item id, or the
    user x content cross): the draws are made for the whole global batch of
    ``global_batch`` from ``(seed, epoch, step, draws)``, and a rank takes those at its
    ``positions`` in it. A resumed run draws the same masks, and N processes drop the
    same examples as one process given the same batch."""
    if rate <= 0:
        return None
    generator = torch.Generator().manual_seed(int(_rng(seed, epoch, step, draws).integers(2**62)))
    return torch.rand(global_batch, generator=generator)[positions] < rate


def id_drops(seed: int, epoch: int, step: int, shard: "Shard", n: int,
             rate: float, draws: int = ITEM_ID_DRAWS) -> torch.Tensor | None:
    """``id_drops_at`` for a rank that holds positions r, r + world_size, ... of a
    global batch of ``n * world_size`` (its ``n`` examples)."""
    global_batch = n * shard.world_size
    return id_drops_at(seed, epoch, step, global_batch,
                       torch.arange(shard.rank, global_batch, shard.world_size), rate, draws)


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
    train on exactly the batches (and id dropout draws) of one process, and
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

    def batches(self, epoch: int, *, item_id_dropout: float = 0.0, cross_id_dropout: float = 0.0,
                start: int = 0) -> Iterator[Batch]:
        """Batches of one epoch, from step ``start`` on; ``*_dropout``: the shares of
        examples whose item id / user x content cross is dropped (``FeatureEncoder.batch``)."""
        order = _rng(self.seed, epoch).permutation(len(self.events))
        mine = order[self.shard.rank::self.shard.world_size][:self._rows_per_rank]
        b = self._rank_batch
        for step in range(start, self.num_batches(epoch)):
            index = torch.from_numpy(mine[step * b:(step + 1) * b])
            n = len(index)
            yield self.features.batch(
                self.events, index,
                drop_item_id=id_drops(self.seed, epoch, step, self.shard, n, item_id_dropout),
                drop_cross_id=id_drops(self.seed, epoch, step, self.shard, n, cross_id_dropout,
                                       CROSS_ID_DRAWS))


class ParquetBatches:
    """Training batches streamed from a parquet file of contract events.

    The file is read as ``data_shards`` streams, fixed by the job and not by the number
    of processes. Each epoch deals the file's pieces (equal runs of rows, at least
    ``min_pieces_per_shard`` per stream and about a row group or smaller) to the streams
    round-robin in a seeded order; a stream shuffles its rows within a buffer of ``buffer_groups``
    pieces, reads its buffers one after the other, and yields the next
    ``batch_size / data_shards`` of its rows a step. Global batch k is the
    k-th rows of every stream, in stream order, and rank r of N reads only streams
    r, r + N, ... So 1, 2 or 4 processes over 4 streams train on the same global batches
    (and id dropout draws), as ``InMemoryBatches`` does, while each rank reads its
    own part of the file. Streams hold the same number of rows (within a few), so an
    epoch leaves out at most about one batch of rows, and every rank stops after the same
    ``num_batches(epoch)`` steps.

    Memory is bounded by ``data_shards / world_size * buffer_groups`` pieces (write the
    file with ``mmdata.write_split``, which shuffles training rows and sets the
    row-group size).
    """

    def __init__(self, path: str | Path, features: FeatureEncoder, *, batch_size: int,
                 seed: int, shard: Shard = Shard(), buffer_groups: int = 1,
                 data_shards: int = 4, min_pieces_per_shard: int = 8) -> None:
        self.path, self.features = Path(path), features
        self.batch_size, self.seed, self.shard = batch_size, seed, shard
        if data_shards < 1 or data_shards % shard.world_size:
            raise ValueError(f"data_shards {data_shards} must be a multiple of the "
                             f"{shard.world_size} processes (set the job's data_shards)")
        self._rank_batch = rank_batch_size(batch_size, shard)
        if batch_size % data_shards:
            raise ValueError(f"batch_size {batch_size} must divide evenly over "
                             f"data_shards {data_shards}")
        if buffer_groups < 1:
            raise ValueError(f"buffer_groups must be >= 1, got {buffer_groups}")
        self.data_shards, self.buffer_groups = data_shards, buffer_groups
        self._stream_batch = batch_size // data_shards
        self._streams = list(range(shard.rank, data_shards, shard.world_size))
        meta = pq.ParquetFile(self.path).metadata
        group_rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.num_rows = int(sum(group_rows))
        # The unit dealt to streams is a piece: one of ``data_shards * m`` equal runs of
        # rows (within one row), so every stream gets m pieces and as many rows as any
        # other. A piece is about a row group or smaller (m >= the groups per stream).
        m = max(min_pieces_per_shard, -(-len(group_rows) // data_shards))
        cuts = np.linspace(0, self.num_rows, data_shards * m + 1).astype(np.int64)
        self._piece_start = cuts[:-1]
        self._piece_rows = np.diff(cuts)  # (n_pieces,)
        # Global positions of this rank's rows in a step's batch (streams in order).
        b = self._stream_batch
        self._positions = torch.cat([torch.arange(v * b, (v + 1) * b) for v in self._streams])
        if self.num_batches(0) == 0:
            raise ValueError(f"{self.path}: {self.num_rows} training events give no full "
                             f"batch of {batch_size} over {data_shards} data shards")

    def _buffers(self, epoch: int, stream: int) -> list[np.ndarray]:
        order = _rng(self.seed, epoch).permutation(len(self._piece_rows))
        mine = order[stream::self.data_shards]
        return [mine[i:i + self.buffer_groups] for i in range(0, len(mine), self.buffer_groups)]

    def _stream_rows_count(self, epoch: int, stream: int) -> int:
        return int(sum(self._piece_rows[b].sum() for b in self._buffers(epoch, stream)))

    def num_batches(self, epoch: int) -> int:
        return min(self._stream_rows_count(epoch, v) for v in range(self.data_shards)
                   ) // self._stream_batch

    def read_pieces(self, pieces: np.ndarray) -> pl.DataFrame:
        """The rows of the given pieces (a lazy scan sliced to each)."""
        scan = pl.scan_parquet(self.path)
        return pl.concat([scan.slice(int(self._piece_start[g]), int(self._piece_rows[g])).collect()
                          for g in pieces])

    def _stream_rows(self, epoch: int, stream: int, start: int
                     ) -> Iterator[list[tuple[EncodedEvents, torch.Tensor]]]:
        """One stream's rows of each step from ``start`` on, as (buffer, row index) parts.

        A stream is its buffers' rows, each buffer shuffled, one after the other; step k
        takes rows ``[k * b, (k + 1) * b)`` of it, so a batch may span two buffers and no
        rows are lost between them. Buffers before step ``start`` are not read.
        """
        b = self._stream_batch
        skip = start * b  # rows of the stream before step `start`
        parts: list[tuple[EncodedEvents, torch.Tensor]] = []
        held = 0
        for i, buffer in enumerate(self._buffers(epoch, stream)):
            n = int(self._piece_rows[buffer].sum())
            if skip >= n:
                skip -= n
                continue
            encoded = self.features.encode(self.read_pieces(buffer), where=str(self.path))
            perm = torch.from_numpy(_rng(self.seed, epoch, stream, i).permutation(n))[skip:]
            skip = 0
            while len(perm):
                take = perm[:b - held]
                parts.append((encoded, take))
                held += len(take)
                perm = perm[len(take):]
                if held == b:
                    yield parts
                    parts, held = [], 0

    def batches(self, epoch: int, *, item_id_dropout: float = 0.0, cross_id_dropout: float = 0.0,
                start: int = 0) -> Iterator[Batch]:
        """Batches of one epoch, from step ``start`` on (``InMemoryBatches.batches``)."""
        streams = [self._stream_rows(epoch, v, start) for v in self._streams]
        for step in range(start, self.num_batches(epoch)):
            rows = _take_rows([part for s in streams for part in next(s)])
            drops = (self.seed, epoch, step, self.batch_size, self._positions)
            yield self.features.batch(
                rows, slice(None), drop_item_id=id_drops_at(*drops, item_id_dropout),
                drop_cross_id=id_drops_at(*drops, cross_id_dropout, CROSS_ID_DRAWS))


def _take_rows(parts: list[tuple[EncodedEvents, torch.Tensor]]) -> EncodedEvents:
    """The rows ``index`` of each ``EncodedEvents``, concatenated in order."""
    if len(parts) == 1:
        events, index = parts[0]
        return EncodedEvents(*(getattr(events, f.name)[index] for f in fields(EncodedEvents)))
    return EncodedEvents(*(torch.cat([getattr(events, f.name)[index] for events, index in parts])
                           for f in fields(EncodedEvents)))


def endless_batches(source: InMemoryBatches | ParquetBatches, *, item_id_dropout: float = 0.0):
    """``source``'s batches epoch after epoch, for as many steps as a measurement needs."""
    epoch = 0
    while True:
        yield from source.batches(epoch, item_id_dropout=item_id_dropout)
        epoch += 1
