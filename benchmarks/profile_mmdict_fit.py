"""Where ``MmDictQuantizer.fit`` spends its time: torch.profiler over a short fit.

    PYTHONPATH=. .venv/bin/python benchmarks/profile_mmdict_fit.py --rows 20000 --dim 384 --steps 50

Fits the default MmDict quantizer (cascade, 16/64/256 x 2 levels, beam 5) on the
synthetic world's content embeddings and prints two tables: the fit's phases (the
methods below, wrapped in ``record_function`` ranges by this script, so the library code
stays free of profiling hooks) and the top operators by self CPU time.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import quantizer.mmdict as mmdict
from mmdata import SyntheticWorldConfig, generate_world

PHASES = [
    (mmdict.MmDictQuantizer, "_init_from_data", "init: PCA + faiss RQ codebooks"),
    (mmdict.MmDictQuantizer, "_restart_dead_codes", "dead-code restart"),
    (mmdict.MultiScaleResidualQuantizer, "search_codes", "fwd: beam search (no grad)"),
    (mmdict.MultiScaleResidualQuantizer, "quantize", "fwd: quantize (incl. beam search)"),
    (mmdict.MultiScaleResidualQuantizer, "decode_latent", "fwd: decoder"),
    (torch.nn.Linear, "forward", "fwd: every nn.Linear"),
    (mmdict, "order_loss", "fwd: order loss"),
    (torch.Tensor, "backward", "backward"),
    (torch.optim.Adam, "step", "optimizer step"),
]


def wrap(owner, name: str, label: str) -> None:
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def timed(*args, **kwargs):
        with record_function(label):
            return inner(*args, **kwargs)

    setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--rows-shown", type=int, default=15)
    args = parser.parse_args()
    world = generate_world(SyntheticWorldConfig(n_items=args.rows, n_events=1000, dim=args.dim),
                           progress=False)
    for owner, name, label in PHASES:
        wrap(owner, name, label)
    config = mmdict.MmDictConfig(steps=args.steps, restart_every=max(args.steps // 2, 1),
                                 beam_size=args.beam)
    print(f"MmDictQuantizer.fit: {args.rows} x {args.dim}, {args.steps} steps, batch "
          f"{config.batch_size}, beam {args.beam}, torch threads {torch.get_num_threads()}")
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("fit (total)"):
            mmdict.MmDictQuantizer(config).fit(world.embeddings.vectors, progress=False)
    print(f"wall {time.perf_counter() - t:.1f} s (profiled)")
    events = prof.key_averages()
    labels = {"fit (total)"} | {label for _, _, label in PHASES}
    total = next(e for e in events if e.key == "fit (total)").cpu_time_total
    print("\n| phase | calls | CPU total s | share of fit |\n|---|---:|---:|---:|")
    for e in sorted((e for e in events if e.key in labels), key=lambda e: -e.cpu_time_total):
        print(f"| {e.key} | {e.count} | {e.cpu_time_total / 1e6:.2f} | "
              f"{100 * e.cpu_time_total / total:.1f}% |")
    print()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows_shown))


if __name__ == "__main__":
    main()
