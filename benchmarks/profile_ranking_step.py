"""Where a training step's time goes: ``no_content`` against ``ids`` with and without the
user × content-ID cross.

Each arm trains on the same precomputed batches (the loader is out of the picture), one
process and one thread; ``torch.profiler`` times every op, passes interleaved across the
arms, and the table gives each op's self CPU time per step (median over passes), the
ops that grow most from ``no_content`` to ``ids`` first, and the distinct table rows a
batch touches (what fbgemm's exact-Adagrad backward pays for). Run (after
``mmtok bench-ranking`` wrote SPLIT/ and CODES)::

    python benchmarks/profile_ranking_step.py --split runs/bench-ranking/synthetic-1m/split \\
        --codes runs/bench-ranking/synthetic-1m/codes/mmtok.parquet
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from ranker import RankerConfig
from ranker.data import ParquetBatches
from ranker.train import build_model, train_step
from ranking_throughput import parse_arm, variant_features  # this folder's script, on sys.path

# Ops are listed by how much they grow from the first arm to the arm "ids" (or the last).
ARMS = "no_content,ids:user_code_cross=none,ids"


def build_arm(split: Path, codes: Path, arm: str, n_batches: int):
    variant, config = parse_arm(arm, RankerConfig())
    features = variant_features(split, codes, variant, config)
    stream = ParquetBatches(split / "train.parquet", features, batch_size=config.batch_size,
                            seed=0).batches(0, item_id_dropout=0.1)
    batches = [next(stream) for _ in range(n_batches)]
    model, sparse_opt, dense_opt = build_model(features, config)
    rows = statistics.median(
        sum(len(torch.unique(kjt[name].values())) for name in features.sparse_names)
        for _, kjt, _ in batches)
    return model, sparse_opt, dense_opt, batches, rows


def run_steps(arm) -> None:
    model, sparse_opt, dense_opt, batches, _ = arm
    for batch in batches:
        train_step(model, sparse_opt, dense_opt, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=Path, required=True, help="directory with train.parquet")
    parser.add_argument("--codes", type=Path, required=True, help="item codes parquet")
    parser.add_argument("--batches", type=int, default=60, help="steps per pass")
    parser.add_argument("--passes", type=int, default=3, help="profiled passes per arm")
    parser.add_argument("--top", type=int, default=12, help="ops to list")
    parser.add_argument("--arms", default=ARMS,
                        help="comma-separated arms as in ranking_throughput.py's --variants")
    args = parser.parse_args()
    torch.set_num_threads(1)
    arms = {name: build_arm(args.split, args.codes, name, args.batches)
            for name in args.arms.split(",")}
    for arm in arms.values():
        run_steps(arm)  # warm-up
    per_op: dict[str, dict[str, list[float]]] = {name: {} for name in arms}
    for _ in range(args.passes):
        for name, arm in arms.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run_steps(arm)
            for event in prof.key_averages():
                per_op[name].setdefault(event.key, []).append(
                    event.self_cpu_time_total / args.batches)
    median = {name: {op: statistics.median(v) for op, v in ops.items()}
              for name, ops in per_op.items()}
    names = list(arms)
    target = "ids" if "ids" in arms else names[-1]
    ops = sorted(set().union(*median.values()),
                 key=lambda op: median[names[0]].get(op, 0) - median[target].get(op, 0))
    for i, name in enumerate(arms):
        print(f"arm {i}: {name}")
    print(f"{'per step':48s}" + "".join(f"{'arm ' + str(i):>14s}" for i in range(len(arms))))
    print(f"{'distinct table rows a batch touches':48s}"
          + "".join(f"{arm[4]:>14,.0f}" for arm in arms.values()))
    for op in ops[:args.top]:
        print(f"{op[:46]:48s}" + "".join(f"{median[n].get(op, 0.0):>11.0f} µs" for n in arms))
    print(f"{'all ops':48s}"
          + "".join(f"{sum(median[n].values()) / 1e3:>11.2f} ms" for n in arms))


if __name__ == "__main__":
    main()
