"""Re-train the variants of a finished ``mmtok bench-ranking`` run on its own split and
codes, over ranker seeds, with ``RankerConfig`` fields changed: an A/B of one setting with
everything else (the split, the quantizer's codes, the seeds) held fixed.

``mmtok bench-ranking --seeds`` refits the quantizers on each call, so two of its runs
differ in their codes as well as in the setting under test. This script reads each
variant's ``job.toml`` under BENCH/variants/, sets ``ranker.seed`` and the given fields,
trains it in this process with ``ranker.job.run_train_job`` (what ``mmtok train`` runs),
prints one line per run and writes every run's test metrics to OUT (JSON, resumable: runs
already in OUT are skipped) and its test predictions beside it (OUT without its suffix,
one parquet per run), then a table of means and the paired bootstrap intervals of
``ranker.comparison_intervals`` over the seeds' predictions. Run::

    PYTHONPATH=. .venv/bin/python benchmarks/retrain_variants.py runs/bench/ml BENCH-AB.json \\
        --seeds 0,1,2,3,4 --variants no_content,dense,recon,ids,ids_dense \\
        --set "table_optimizer=rowwise_adagrad"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import polars as pl

from ranker import comparison_intervals, lift_lost
from ranker.job import PREDICTIONS_FILE, TrainJob, run_train_job
from ranking_throughput import parse_arm  # this folder's script, on sys.path

KEPT = ("auc", "auc_warm", "auc_cold", "logloss", "ne", "train_examples_per_s", "best_epoch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path, help="output directory of mmtok bench-ranking")
    parser.add_argument("out", type=Path, help="JSON file of the runs")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="no_content,dense,recon,ids,ids_dense")
    parser.add_argument("--set", default="", help="RankerConfig fields: FIELD=VALUE;FIELD=VALUE")
    args = parser.parse_args()
    runs = json.loads(args.out.read_text()) if args.out.exists() else {}
    seeds, variants = [int(s) for s in args.seeds.split(",")], args.variants.split(",")
    for seed in seeds:
        for variant in variants:
            key = f"{variant}/{seed}"
            if key in runs:
                continue
            # A bench writes variants/<name>/seed-<s>/job.toml (one job per seed): any
            # seed's job is the variant's, its seed set below.
            job = TrainJob.from_toml(sorted((args.bench / "variants" / variant).glob(
                "**/job.toml"))[0])
            _, config = parse_arm(f"{variant}:{args.set}", job.ranker)
            scratch = args.out.with_suffix("") / f"{variant}-{seed}"
            shutil.rmtree(scratch, ignore_errors=True)
            job = dataclasses.replace(job, out=str(scratch),
                                      ranker=dataclasses.replace(config, seed=seed))
            metrics = run_train_job(job, progress=False)
            # Only the test predictions stay, for the paired intervals below.
            shutil.move(scratch / PREDICTIONS_FILE, scratch.parent / f"{variant}-{seed}.parquet")
            shutil.rmtree(scratch, ignore_errors=True)
            runs[key] = {k: metrics[k] for k in KEPT}
            args.out.write_text(json.dumps(runs, indent=1))
            print(f"{key}: AUC {metrics['auc']:.4f} (cold {metrics['auc_cold']:.4f})", flush=True)

    def mean(variant: str, key: str = "auc") -> float:
        return statistics.mean(runs[f"{variant}/{s}"][key] for s in seeds)

    print(f"\n{args.set or 'the jobs as written'}, seeds {args.seeds}")
    print("| variant | AUC (mean ± sd) | AUC warm | AUC cold | NE |")
    for v in variants:
        sd = statistics.pstdev(runs[f"{v}/{s}"]["auc"] for s in seeds)
        print(f"| {v} | {mean(v):.4f} ± {sd:.4f} | {mean(v, 'auc_warm'):.4f} | "
              f"{mean(v, 'auc_cold'):.4f} | {mean(v, 'ne'):.4f} |")
    if "dense" in variants:
        for v, name in (("ids", "lift_lost"), ("recon", "lift_lost_recon")):
            if v in variants:
                print(f"{name}: {lift_lost(mean('dense'), mean(v)):+.2%}")
        if "ids_dense" in variants:
            print("ids_dense - dense per seed:", ", ".join(
                f"{runs[f'ids_dense/{s}']['auc'] - runs[f'dense/{s}']['auc']:+.4f}" for s in seeds))
    kept = args.out.with_suffix("")
    files = {v: [kept / f"{v}-{s}.parquet" for s in seeds] for v in variants}
    files = {v: paths for v, paths in files.items() if all(p.exists() for p in paths)}
    if files:
        frames = {v: [pl.read_parquet(p) for p in paths] for v, paths in files.items()}
        first = next(iter(frames.values()))[0]
        intervals = comparison_intervals(
            first["label"].to_numpy(), first["is_cold"].to_numpy(),
            {v: np.stack([f["prob"].to_numpy() for f in fs]) for v, fs in frames.items()})
        print("\npaired bootstrap over the test rows, the seeds' mean AUC per resample:")
        print("| comparison | rows | value | 95% interval | ahead on |")
        for key, e in intervals.items():
            unit = (lambda x: f"{x:+.2%}") if e["measure"] == "lift_lost" else (lambda x: f"{x:+.4f}")
            print(f"| {key}: {e['variant']} vs {e['reference']} | {e['rows']} | {unit(e['value'])} | "
                  f"{unit(e['low'])} to {unit(e['high'])} | {e['p_favourable']:.0%} |")


if __name__ == "__main__":
    main()
