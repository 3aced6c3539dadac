"""The evaluation protocol's split, one function used by every tool.

Time split: after a stable sort by ``ts``, the last ``test_frac`` of events are
test and the ``valid_frac`` before them validation, the rest train. On top, a seeded
``holdout_frac`` of items are held out: their events before the test period are
dropped, so they reach the model cold. An item with no training event (held out, or
launched late) is *cold*; every valid/test row carries ``is_cold``.

    events sorted by ts ───────────────────────────────────────────────▶
    |<──────────── train (80%) ────────────>|<─ valid ─>|<── test ──>|
      held-out items' rows dropped here  ───────────────┘  kept here
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from mmdata.contracts import scan_events


@dataclass
class EventSplit:
    """Train / validation / test events and the held-out items.

    ``valid`` and ``test`` carry a boolean ``is_cold`` column: the row's item has no
    training event.
    """

    train: pl.DataFrame
    valid: pl.DataFrame
    test: pl.DataFrame
    holdout_items: np.ndarray
    # Item ids that have at least one training event (the "warm" vocabulary).
    warm_items: np.ndarray

    def summary(self) -> dict:
        def part(df: pl.DataFrame) -> dict:
            out = {"rows": df.height, "positive_rate": float(df["label"].mean() or 0.0)}
            if "is_cold" in df.columns:
                out["cold_rows"] = int(df["is_cold"].sum())
            return out

        return {
            "train": part(self.train),
            "valid": part(self.valid),
            "test": part(self.test),
            "holdout_items": int(len(self.holdout_items)),
            "warm_items": int(len(self.warm_items)),
        }


def split_events(
    events: pl.DataFrame | pl.LazyFrame,
    *,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    holdout_frac: float = 0.1,
    seed: int = 0,
) -> EventSplit:
    """Splits contract events by time and holds out a seeded share of items.

    Args:
        events: frame following the events contract (a ``LazyFrame`` is collected).
        valid_frac, test_frac: shares of events (by time) for validation and test.
        holdout_frac: share of distinct items whose pre-test events are dropped.
        seed: seeds the choice of held-out items.

    Example::

        split = split_events(events, seed=0)
        split.test.filter(pl.col("is_cold"))  # cold test rows
    """
    plans = _split_plans(events.lazy(), valid_frac=valid_frac, test_frac=test_frac,
                         holdout_frac=holdout_frac, seed=seed)
    train, valid, test = pl.collect_all([plans.train, plans.valid, plans.test])
    return EventSplit(train=train, valid=valid, test=test, holdout_items=plans.holdout_items,
                      warm_items=plans.warm_items)


@dataclass
class SplitFiles:
    """The split written to parquet (see ``write_split``); ``train`` rows are shuffled."""

    train: Path
    valid: Path
    test: Path
    summary: dict


def write_split(
    events: str | Path | pl.LazyFrame,
    out_dir: str | Path,
    *,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    holdout_frac: float = 0.1,
    seed: int = 0,
    row_group_rows: int = 131_072,
) -> SplitFiles:
    """The same split as ``split_events``, streamed from parquet to parquet, so events
    that do not fit in memory can be split. Training rows are written in a seeded
    shuffled order, in row groups of ``row_group_rows``: a streaming reader that
    visits row groups in random order then sees well-mixed batches.

    Writes ``out_dir/{train,valid,test}.parquet`` and ``out_dir/split.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scan = scan_events(events) if isinstance(events, (str, Path)) else events
    plans = _split_plans(scan, valid_frac=valid_frac, test_frac=test_frac,
                         holdout_frac=holdout_frac, seed=seed)
    paths = SplitFiles(out / "train.parquet", out / "valid.parquet", out / "test.parquet", {})
    shuffle_key = pl.int_range(0, pl.len(), dtype=pl.UInt64).hash(seed)
    plans.train.sort(shuffle_key).sink_parquet(paths.train, row_group_size=row_group_rows)
    plans.valid.sink_parquet(paths.valid, row_group_size=row_group_rows)
    plans.test.sink_parquet(paths.test, row_group_size=row_group_rows)

    def part(path: Path, cold: bool) -> dict:
        cols = [pl.len().alias("rows"), pl.col("label").mean().alias("positive_rate")]
        if cold:
            cols.append(pl.col("is_cold").sum().alias("cold_rows"))
        row = pl.scan_parquet(path).select(cols).collect().row(0, named=True)
        return {k: (float(v) if k == "positive_rate" else int(v)) for k, v in row.items()}

    paths.summary = {"train": part(paths.train, False), "valid": part(paths.valid, True),
                     "test": part(paths.test, True),
                     "holdout_items": int(len(plans.holdout_items)),
                     "warm_items": int(len(plans.warm_items))}
    (out / "split.json").write_text(json.dumps(paths.summary, indent=2))
    return paths


@dataclass
class _SplitPlans:
    train: pl.LazyFrame
    valid: pl.LazyFrame
    test: pl.LazyFrame
    holdout_items: np.ndarray
    warm_items: np.ndarray


def _split_plans(events: pl.LazyFrame, *, valid_frac: float, test_frac: float,
                 holdout_frac: float, seed: int) -> _SplitPlans:
    if not 0 < valid_frac + test_frac < 1:
        raise ValueError(f"valid_frac + test_frac must be in (0, 1), got {valid_frac + test_frac}")
    if not 0 <= holdout_frac < 1:
        raise ValueError(f"holdout_frac must be in [0, 1), got {holdout_frac}")
    n = events.select(pl.len()).collect().item()
    if n < 10:
        raise ValueError(f"need at least 10 events to split, got {n}")

    # Row order breaks ts ties, so the split is a pure function of the file.
    ordered = events.with_row_index("_row").sort("ts", "_row")
    n_test = int(round(n * test_frac))
    n_valid = int(round(n * valid_frac))
    n_train = n - n_valid - n_test
    position = pl.int_range(0, pl.len(), dtype=pl.Int64)
    part = (
        pl.when(position < n_train).then(pl.lit(0, pl.Int8))
        .when(position < n_train + n_valid).then(pl.lit(1, pl.Int8))
        .otherwise(pl.lit(2, pl.Int8))
    )
    ordered = ordered.with_columns(part.alias("_part"))

    items = np.sort(events.select(pl.col("item_id").unique()).collect()["item_id"].to_numpy())
    rng = np.random.default_rng(seed)
    n_holdout = int(round(len(items) * holdout_frac))
    holdout = np.sort(rng.choice(items, size=n_holdout, replace=False)) if n_holdout else items[:0]
    holdout_series = pl.Series("holdout", holdout, dtype=pl.Int64)

    is_holdout = pl.col("item_id").is_in(holdout_series.implode())
    kept = ordered.filter(~(is_holdout & (pl.col("_part") < 2)))
    train = kept.filter(pl.col("_part") == 0)
    warm = np.sort(train.select(pl.col("item_id").unique()).collect()["item_id"].to_numpy())
    warm_series = pl.Series("warm", warm, dtype=pl.Int64)
    cold = (~pl.col("item_id").is_in(warm_series.implode())).alias("is_cold")

    def finish(df: pl.LazyFrame) -> pl.LazyFrame:
        return df.drop("_row", "_part")

    return _SplitPlans(
        train=finish(train),
        valid=finish(kept.filter(pl.col("_part") == 1).with_columns(cold)),
        test=finish(kept.filter(pl.col("_part") == 2).with_columns(cold)),
        holdout_items=holdout,
        warm_items=warm,
    )
