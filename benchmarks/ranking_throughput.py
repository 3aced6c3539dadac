"""Is the streaming loader the bottleneck? Loader alone vs loader + training step.

For each variant (``no_content`` and ``ids`` by default) this streams the training
split from parquet with ``ranker.ParquetBatches`` and reports examples/s of
(a) the loader alone (read row groups, encode ids, gather codes, build KJT batches),
(b) the full training step (forward, backward, fused Adagrad + Adam) fed by it,
each the median of ``--repeats`` timed windows of ``--steps`` steps, all in one
process, so the ratios are comparable on a shared machine. Also prints peak RSS.

Run (after ``mmtok bench-ranking`` wrote SPLIT/ and CODES)::

    python benchmarks/ranking_throughput.py --split runs/bench-ranking/synthetic-1m/split \
        --codes runs/bench-ranking/synthetic-1m/codes/mmtok.parquet --out runs/throughput
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import polars as pl
import torch

from ranker import FeatureEncoder, RankerConfig
from ranker.data import ParquetBatches
from ranker.job import TrainJob, load_item_content
from ranker.train import build_model, train_step


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(split: Path, codes: Path, variant: str, *, steps: int, repeats: int,
            batch_size: int) -> dict:
    job = TrainJob(split_dir=str(split), out="-", variant=variant, item_codes=str(codes),
                   ranker=RankerConfig(batch_size=batch_size))
    content = load_item_content(job)
    features = FeatureEncoder(pl.scan_parquet(split / "train.parquet"), content,
                              use_codes=variant.startswith("ids"), use_dense_content=False)
    source = ParquetBatches(split / "train.parquet", features, batch_size=batch_size, seed=0)
    torch.set_num_threads(job.ranker.num_threads)

    def stream():
        epoch = 0
        while True:  # as many epochs as the windows need
            yield from source.batches(epoch, item_id_dropout=0.1)
            epoch += 1

    def windows(fn) -> list[float]:
        rates = []
        it = stream()
        for _ in range(repeats + 1):  # the first window warms up
            start, n = time.perf_counter(), 0
            for _ in range(steps):
                n += fn(next(it))
            rates.append(n / (time.perf_counter() - start))
        return rates[1:]

    loader = windows(lambda batch: len(batch[2]))
    model, sparse_opt, dense_opt = build_model(features, job.ranker)

    def step(batch) -> int:
        train_step(model, sparse_opt, dense_opt, batch)
        return len(batch[2])

    trainer = windows(step)
    return {"variant": variant, "loader_ex_per_s": statistics.median(loader),
            "train_ex_per_s": statistics.median(trainer), "loader_runs": loader,
            "train_runs": trainer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", type=Path, required=True)
    parser.add_argument("--codes", type=Path, required=True)
    parser.add_argument("--variants", default="no_content,ids")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("runs/throughput"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [measure(args.split, args.codes, v, steps=args.steps, repeats=args.repeats,
                    batch_size=args.batch_size) for v in args.variants.split(",")]
    print(f"\n{'variant':<12} {'loader ex/s':>12} {'train ex/s':>12} {'loader/train':>13}")
    for r in rows:
        print(f"{r['variant']:<12} {r['loader_ex_per_s']:>12,.0f} {r['train_ex_per_s']:>12,.0f} "
              f"{r['loader_ex_per_s'] / r['train_ex_per_s']:>12.1f}x")
    base = {r["variant"]: r["train_ex_per_s"] for r in rows}
    if "no_content" in base and "ids" in base:
        print(f"\nids / no_content training throughput: {base['ids'] / base['no_content']:.2f}")
    print(f"peak RSS {rss_mb():,.0f} MB")
    (args.out / "throughput.json").write_text(json.dumps({"rows": rows, "peak_rss_mb": rss_mb()},
                                                         indent=2))


if __name__ == "__main__":
    main()
