"""Paired intervals between variants of different `mmtok bench-ranking` runs.

    .venv/bin/python benchmarks/compare_bench_runs.py \
        runs/rank-taste-cascade:ids runs/rank-taste-parallel:ids

A comparison one bench run cannot make: two settings of the quantizer (say its scale
mode) each get their own run, over the same events, split seed and ranker seeds. The
first ``RUN:VARIANT`` is the reference; every other one is compared with it, on all test
rows and on cold rows, with the bench's own interval (``ranker.metrics.bootstrap_aucs``:
resamples of the test rows, paired, that also draw each variant's training seeds). The
runs must have scored the same test rows: their predictions' (user, item, label) rows
are checked to match.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl

from ranker.job import PREDICTIONS_FILE
from ranker.metrics import auc, bootstrap_aucs


def seed_predictions(run_variant: str) -> tuple[pl.DataFrame, np.ndarray]:
    """The test rows (user, item, label, is_cold) and the (S, N) scores of every seed."""
    run, _, variant = run_variant.rpartition(":")
    files = sorted((Path(run) / "variants" / variant).glob(f"seed-*/{PREDICTIONS_FILE}"))
    if not run or not files:
        raise SystemExit(f"{run_variant}: no {PREDICTIONS_FILE} under RUN/variants/VARIANT/seed-*")
    frames = [pl.read_parquet(f) for f in files]
    rows = frames[0].select("user_id", "item_id", "label", "is_cold")
    for f, frame in zip(files[1:], frames[1:]):
        if not frame.select(rows.columns).equals(rows):
            raise SystemExit(f"{f}: other test rows than {files[0]}")
    return rows, np.stack([frame["prob"].to_numpy() for frame in frames])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="RUN_DIR:VARIANT, the first is the reference")
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    if len(args.runs) < 2:
        raise SystemExit("need a reference and at least one RUN:VARIANT to compare with it")
    loaded = {name: seed_predictions(name) for name in args.runs}
    rows = loaded[args.runs[0]][0]
    for name, (other, _) in loaded.items():
        if not other.equals(rows):
            raise SystemExit(f"{name} scored other test rows than {args.runs[0]}: "
                             "same events, split seed and hold-out needed")
    labels, cold = rows["label"].to_numpy(), rows["is_cold"].to_numpy()
    scores = {name: s for name, (_, s) in loaded.items()}
    subsets = {"all": np.ones(len(labels), dtype=bool), "cold": cold}
    boot = bootstrap_aucs(labels, scores, subsets=subsets, n_boot=args.resamples)
    print("| variant | rows | seeds | AUC per seed | mean | vs reference | 95% interval | ahead on |")
    print("|---|---|---:|---|---:|---:|---|---:|")
    reference = args.runs[0]
    for name, s in scores.items():
        for subset, mask in subsets.items():
            per_seed = [auc(labels[mask], seed_scores[mask]) for seed_scores in s]
            mean = float(np.mean(per_seed))
            line = (f"| {name} | {subset} | {len(s)} | {' / '.join(f'{a:.4f}' for a in per_seed)} "
                    f"| {mean:.4f} |")
            if name == reference:
                print(line + " — | — | — |")
                continue
            ref_mean = float(np.mean([auc(labels[mask], r[mask]) for r in scores[reference]]))
            diff = boot[name, subset] - boot[reference, subset]
            low, high = np.quantile(diff, [0.025, 0.975])
            print(line + f" {mean - ref_mean:+.4f} | {low:+.4f} to {high:+.4f} "
                         f"| {(diff > 0).mean():.0%} |")


if __name__ == "__main__":
    main()
