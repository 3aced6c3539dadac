"""MmDict's scales as a cascade (one residual chain) or in parallel (complementary
dictionaries with an orthogonality penalty), each at its own learning rates, against
faiss RQ at equal bits.

    .venv/bin/python benchmarks/scale_modes.py                          # all corpora
    .venv/bin/python benchmarks/scale_modes.py --corpora docstrings --lr-codebooks 1e-4,1e-3

The protocol of ``mmtok bench-quantizer`` (``mmtok.bench_quantizer``): a seeded split of
the rows, fit on 80%, measured on the held-out 20% (at most 10,000); every quantizer gets
the default layout (16/64/256 x 2 levels = 36 bits). Each mode is fitted once per
(lr, lr_codebooks) setting; its steps are the fit's own (it stops on held-out *fit* rows
and keeps the best step), so every mode gets its best stopping point without looking at
the measured rows. The setting each mode keeps is the one with the lowest loss on its
fit's own validation rows (``training.valid_loss_best``: reconstruction + order loss),
reported beside every setting's measured figures. Corpora: those of ``benchmarks/quantizer_corpora.py``
(built there). Writes ``metrics.json`` under --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mmdata import read_embeddings
from mmtok.bench_quantizer import fit_and_measure, held_out_split
from quantizer import MmDictConfig, MmDictQuantizer
from quantizer.baselines import FaissRQ
from quantizer.metrics import rel_mse

CORPORA = Path("runs/bench-quantizer/corpora")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/scale-modes"))
    parser.add_argument("--corpora", default="movielens,docstrings,synthetic")
    parser.add_argument("--modes", default="cascade,parallel")
    parser.add_argument("--lr", type=_floats, default=[1e-3], help="decoder learning rates")
    parser.add_argument("--lr-codebooks", type=_floats, default=[1e-4, 1e-3],
                        help="encoder + codebook learning rates")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = {}
    for corpus in args.corpora.split(","):
        path = CORPORA / f"{corpus}.parquet"
        if not path.exists():
            print(f"\n== {corpus}: no embeddings at {path} (benchmarks/quantizer_corpora.py "
                  f"builds them), skipped")
            continue
        x = read_embeddings(path).vectors.astype(np.float32)
        fit_rows, held = held_out_split(len(x), args.seed)
        x_fit, x_held = x[fit_rows], x[held]
        print(f"\n== {corpus}: {len(x)} x {x.shape[1]}, fit {len(x_fit)}, held out {len(x_held)}")
        rows = {"faiss_rq": fit_and_measure(FaissRQ(MmDictQuantizer().codebook_sizes),
                                            x_fit, x_held, seed=args.seed, progress=False)[0]}
        for mode, lr, lr_books in itertools.product(args.modes.split(","), args.lr,
                                                    args.lr_codebooks):
            q = MmDictQuantizer(MmDictConfig(mode=mode, lr=lr, lr_codebooks=lr_books,
                                             seed=args.seed))
            metrics, codes = fit_and_measure(q, x_fit, x_held, seed=args.seed, progress=True)
            metrics["codeword_sum_rel_mse"] = rel_mse(x_held, q.decode_codewords(codes))
            metrics["training"] = q.training_summary
            metrics["config"] = asdict(q.config)
            rows[f"{mode} lr={lr:g} lr_codebooks={lr_books:g}"] = metrics
        results[corpus] = rows
        rq = rows["faiss_rq"]
        print("| quantizer | rel_mse (codeword sum) | recall@10 | kendall_tau | utilization "
              "| fit validation loss | refine its / steps kept | fit s | encode items/s |")
        print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
        for name, m in rows.items():
            t = m.get("training", {})
            print(f"| {name} | {m['rel_mse']:.4f} ({m.get('codeword_sum_rel_mse', m['rel_mse']):.4f}) "
                  f"| {m['recall_at_10']:.4f} | {m['kendall_tau']:.4f} | {m['utilization']:.3f} "
                  f"| {t.get('valid_loss_best', float('nan')):.4f} "
                  f"| {t.get('refine_iterations', '-')} / {t.get('best_step', '-')} "
                  f"| {m['fit_s']:.1f} | {m['encode_items_per_s']:,.0f} |")
        for mode in args.modes.split(","):
            kept = min((k for k in rows if k.startswith(mode)),
                       key=lambda k: rows[k]["training"].get("valid_loss_best", np.inf))
            m = rows[kept]
            print(f"{mode} keeps {kept!r}: rel_mse {m['rel_mse'] / rq['rel_mse']:.3f}x faiss RQ's, "
                  f"recall@10 {m['recall_at_10'] - rq['recall_at_10']:+.4f}, "
                  f"tau {m['kendall_tau'] - rq['kendall_tau']:+.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "metrics.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
