"""Is the streaming loader the bottleneck? Loader alone vs loader + training step.

For each variant (``no_content`` and ``ids`` by default) this streams the training
split from parquet with ``ranker.ParquetBatches`` and reports examples/s of
(a) the loader alone (read row groups, encode ids, gather codes, build KJT batches),
(b) the full training step (forward, backward, fused Adagrad + Adam) fed by it,
each the median of ``--repeats`` timed windows of ``--steps`` steps, interleaved
across variants in one process, so the ratios are comparable on a shared machine; the
ids / no_content ratio is the median of the per-round ratios. Also prints peak RSS.

The model is the default ``RankerConfig`` (prefix n-grams on) or the ``[ranker]`` table
of ``--config``. A variant may carry its own settings for an A/B in one process:
``ids:table_optimizer=adagrad`` is an arm of ``ids`` with that ``RankerConfig``
field changed; every arm after ``no_content`` gets its paired ratio over it. Run (after
``mmtok bench-ranking`` wrote SPLIT/ and CODES)::

    python benchmarks/ranking_throughput.py --split runs/bench-ranking/synthetic-1m/split \
        --codes runs/bench-ranking/synthetic-1m/codes/mmtok.parquet --out runs/throughput \
        [--variants no_content,ids,ids:table_optimizer=adagrad]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import time
from pathlib import Path

import polars as pl
import torch

from ranker import FeatureEncoder, RankerConfig
from ranker.data import ParquetBatches, endless_batches
from ranker.job import TrainJob, load_item_content, load_ranker_config
from ranker.train import build_model, train_step


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def variant_features(split: Path, codes: Path, variant: str,
                     config: RankerConfig) -> FeatureEncoder:
    """The feature encoder ``variant`` trains with (no dense content: ids variants only).
    ``codes``: ``mmtok quantize``'s ``OUT/item_codes.parquet`` (its quantizer is
    ``OUT/quantizer``) or a bench's ``codes/<name>.parquet`` (``quantizers/<name>``)."""
    quantizer = codes.parent / "quantizer"
    if not quantizer.is_dir():
        quantizer = codes.parent.parent / "quantizers" / codes.stem
    job = TrainJob(split_dir=str(split), out="-", variant=variant, item_codes=str(codes),
                   quantizer=str(quantizer), ranker=config)
    return FeatureEncoder.from_config(pl.scan_parquet(split / "train.parquet"),
                                      load_item_content(job), config,
                                      use_codes=variant.startswith("ids"), use_dense_content=False)


def parse_arm(arm: str, config: RankerConfig) -> tuple[str, RankerConfig]:
    """``"ids:field=value;field=value"`` -> ``("ids", config with those fields)``; values are
    parsed as the field's type (int, float, bool or str)."""
    variant, _, overrides = arm.partition(":")
    fields = {f.name for f in dataclasses.fields(RankerConfig)}
    changes = {}
    for item in filter(None, overrides.split(";")):
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"arm {arm!r}: {item!r} is not FIELD=VALUE of a RankerConfig field")
        kind = type(getattr(config, key))
        changes[key] = value.lower() == "true" if kind is bool else kind(value)
    return variant, dataclasses.replace(config, **changes)


class Bench:
    """One variant's loader and training step, each fed by its own stream of batches."""

    def __init__(self, split: Path, codes: Path, arm: str, config: RankerConfig) -> None:
        variant, config = parse_arm(arm, config)
        features = variant_features(split, codes, variant, config)
        self.variant, self.features = arm, features
        self.source = ParquetBatches(split / "train.parquet", features,
                                     batch_size=config.batch_size, seed=0)
        self.model, self.sparse_opt, self.dense_opt = build_model(features, config)
        self.loader_stream, self.train_stream = (
            endless_batches(self.source, item_id_dropout=config.item_id_dropout)
            for _ in range(2))
        self.rates: dict[str, list[float]] = {"loader": [], "train": []}

    def window(self, kind: str, steps: int) -> float:
        """Examples/s over ``steps`` batches of the loader alone or loader + training step."""
        stream = self.loader_stream if kind == "loader" else self.train_stream
        start, n = time.perf_counter(), 0
        for _ in range(steps):
            batch = next(stream)
            if kind == "train":
                train_step(self.model, self.sparse_opt, self.dense_opt, batch)
            n += len(batch[2])
        return n / (time.perf_counter() - start)


def measure(benches: list[Bench], *, steps: int, repeats: int) -> list[dict]:
    """Windows interleaved across variants (a burst of load on a shared machine hits
    all of them alike); the first round warms up and is dropped."""
    for round_ in range(repeats + 1):
        for bench in benches:
            for kind in ("loader", "train"):
                rate = bench.window(kind, steps)
                if round_:
                    bench.rates[kind].append(rate)
    return [{"variant": b.variant, "loader_ex_per_s": statistics.median(b.rates["loader"]),
             "train_ex_per_s": statistics.median(b.rates["train"]),
             "loader_runs": b.rates["loader"], "train_runs": b.rates["train"],
             "sparse_features": b.features.sparse_names} for b in benches]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", type=Path, required=True)
    parser.add_argument("--codes", type=Path, required=True)
    parser.add_argument("--variants", default="no_content,ids",
                        help="comma-separated arms: a variant, optionally with RankerConfig "
                             "fields changed: ids:FIELD=VALUE;FIELD=VALUE")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: the config's batch_size")
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML whose [ranker] table sets the model (default RankerConfig)")
    parser.add_argument("--out", type=Path, default=Path("runs/throughput"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config = load_ranker_config(args.config) if args.config else RankerConfig()
    if args.batch_size:
        config = dataclasses.replace(config, batch_size=args.batch_size)
    print(f"prefix_ngrams={config.prefix_ngrams} code_pooling={config.code_pooling} "
          f"interaction={config.interaction} batch {config.batch_size}")
    torch.set_num_threads(config.num_threads)
    benches = [Bench(args.split, args.codes, v, config) for v in args.variants.split(",")]
    rows = measure(benches, steps=args.steps, repeats=args.repeats)
    width = max(12, *(len(r["variant"]) for r in rows))
    print(f"\n{'variant':<{width}} {'loader ex/s':>12} {'train ex/s':>12} {'loader/train':>13}")
    for r in rows:
        print(f"{r['variant']:<{width}} {r['loader_ex_per_s']:>12,.0f} {r['train_ex_per_s']:>12,.0f} "
              f"{r['loader_ex_per_s'] / r['train_ex_per_s']:>12.1f}x")
    runs = {r["variant"]: r["train_runs"] for r in rows}
    paired = {}
    print()
    for arm in (a for a in runs if a != "no_content" and "no_content" in runs):
        # One ratio per round, from windows taken seconds apart: a burst of load on a
        # shared machine moves both, so the paired ratios scatter less than the rates.
        ratios = sorted(i / n for i, n in zip(runs[arm], runs["no_content"]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        print(f"{arm} / no_content training throughput: {statistics.median(ratios):.2f} "
              f"(median of {len(ratios)} paired rounds; quartiles {q[0]:.2f}-{q[2]:.2f})")
        paired[arm] = ratios
    print(f"peak RSS {rss_mb():,.0f} MB")
    (args.out / "throughput.json").write_text(json.dumps({"rows": rows, "over_no_content": paired,
                                                          "peak_rss_mb": rss_mb()},
                                                         indent=2))


if __name__ == "__main__":
    main()
