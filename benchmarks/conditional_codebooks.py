"""Conditional (QINCo-style) residual quantization against faiss RQ at equal bits.

    .venv/bin/python benchmarks/conditional_codebooks.py                      # all corpora
    .venv/bin/python benchmarks/conditional_codebooks.py --corpora synthetic \
        --hidden 256 --candidates 16 --beam 5 --steps 400

The protocol of ``mmtok bench-quantizer`` (``mmtok.bench_quantizer``): a seeded split of
the rows, fit on 80%, measured on the held-out 20% (at most 10,000) with
``quantizer.metrics.quantizer_metrics``; both quantizers get the default layout
(16/64/256 x 2 levels = 36 bits). Corpora: the synthetic world's 50,000 x 384 content
embeddings (built once, cached under --out) and, where they exist, the MiniLM docstring
and MovieLens embeddings of ``benchmarks/quantizer_corpora.py``. Prints one table per
corpus and the bar a learned quantizer is held to (rel_mse <= 0.9x faiss RQ's,
recall@10 >= +0.02, tau >= +0.01, every codebook >= 95% used); writes ``metrics.json``
under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mmdata import SyntheticWorldConfig, generate_world, read_embeddings, write_embeddings
from mmtok.bench_quantizer import fit_and_measure, held_out_split
from quantizer.baselines import FaissRQ
from quantizer.conditional import ConditionalRQConfig, ConditionalRQQuantizer

SHARED_CORPORA = Path("runs/bench-quantizer/corpora")


def corpus_path(name: str, out: Path) -> Path | None:
    """The corpus' embeddings file; the synthetic one is built on first use."""
    if name != "synthetic":
        path = SHARED_CORPORA / f"{name}.parquet"
        return path if path.exists() else None
    path = out / "corpora" / "synthetic.parquet"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        world = generate_world(SyntheticWorldConfig(n_items=50_000, n_events=1000, dim=384),
                               progress=False)
        write_embeddings(world.embeddings, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/conditional-codebooks"))
    parser.add_argument("--corpora", default="synthetic,docstrings,movielens")
    parser.add_argument("--seed", type=int, default=0)
    defaults = ConditionalRQConfig()
    parser.add_argument("--hidden", type=int, default=defaults.hidden)
    parser.add_argument("--candidates", type=int, default=defaults.candidates)
    parser.add_argument("--beam", type=int, default=defaults.beam_size)
    parser.add_argument("--train-beam", type=int, default=defaults.train_beam_size)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--lr-codebooks", type=float, default=defaults.lr_codebooks)
    parser.add_argument("--tag", default="default", help="name of this setting in metrics.json")
    args = parser.parse_args()
    config = ConditionalRQConfig(hidden=args.hidden, candidates=args.candidates,
                                 beam_size=args.beam, train_beam_size=args.train_beam,
                                 steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                 lr_codebooks=args.lr_codebooks, seed=args.seed)
    print(f"conditional_rq config: {config}")
    results = {}
    for name in args.corpora.split(","):
        path = corpus_path(name, args.out)
        if path is None:
            print(f"\n== {name}: no embeddings at {SHARED_CORPORA}, skipped")
            continue
        x = read_embeddings(path).vectors.astype(np.float32)
        fit_rows, held = held_out_split(len(x), args.seed)
        x_fit, x_held = x[fit_rows], x[held]
        print(f"\n== {name}: {len(x)} x {x.shape[1]}, fit {len(x_fit)}, held out {len(x_held)}")
        conditional = ConditionalRQQuantizer(config)
        rows = {name: fit_and_measure(q, x_fit, x_held, seed=args.seed, progress=True)[0]
                for name, q in (("faiss_rq", FaissRQ(conditional.codebook_sizes)),
                                ("conditional_rq", conditional))}
        rows["conditional_rq"]["training"] = conditional.training_summary
        results[name] = rows
        print(f"training: {conditional.training_summary}")
        print("| quantizer | bits | rel_mse | recall@10 | kendall_tau | utilization | fit s "
              "| encode items/s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for qname, m in rows.items():
            print(f"| {qname} | {m['bits']:.0f} | {m['rel_mse']:.4f} | {m['recall_at_10']:.4f} | "
                  f"{m['kendall_tau']:.4f} | {m['utilization']:.3f} | {m['fit_s']:.1f} | "
                  f"{m['encode_items_per_s']:,.0f} |")
        rq, cq = rows["faiss_rq"], rows["conditional_rq"]
        bar = {"rel_mse <= 0.9 x rq": cq["rel_mse"] <= 0.9 * rq["rel_mse"],
               "recall@10 >= rq + 0.02": cq["recall_at_10"] >= rq["recall_at_10"] + 0.02,
               "tau >= rq + 0.01": cq["kendall_tau"] >= rq["kendall_tau"] + 0.01,
               "utilization >= 0.95": cq["utilization"] >= 0.95}
        print(f"rel_mse ratio {cq['rel_mse'] / rq['rel_mse']:.3f}, recall@10 "
              f"{cq['recall_at_10'] - rq['recall_at_10']:+.4f}, tau "
              f"{cq['kendall_tau'] - rq['kendall_tau']:+.4f}; bar: "
              + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in bar.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    metrics_path = args.out / f"metrics-{args.tag}.json"
    metrics_path.write_text(json.dumps({"config": vars(config), "corpora": results}, indent=2,
                                       default=str))
    print(f"\nwrote {metrics_path}")


if __name__ == "__main__":
    main()
