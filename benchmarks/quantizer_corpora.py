"""Quantizer benchmark over three corpora: mmtok vs faiss RQ/PQ, k-means and LSH.

    .venv/bin/python benchmarks/quantizer_corpora.py --out runs/bench-quantizer

Builds (once, cached under --out) the embeddings of
  * movielens:  MiniLM embeddings of the 1,682 MovieLens-100K movie texts (real text);
  * docstrings: MiniLM embeddings of 50,000 docstrings of the installed Python sources
                (real English text, built offline);
  * synthetic:  the synthetic world's 50,000 x 384 content embeddings;
runs `mmtok bench-quantizer` on each at the default codebooks (16/64/256 x 2 levels,
36 bits) and prints one table per corpus plus a summary of mmtok against faiss RQ.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import polars as pl

from featurizer import embed_items, minilm_text_encoder
from mmdata import SyntheticWorldConfig, generate_world, load_movielens_100k, write_embeddings
from mmdata.docstrings import load_docstring_corpus
from mmtok.bench_quantizer import run_bench_quantizer


def build_corpora(out: Path, n_docstrings: int, n_synthetic: int) -> dict[str, Path]:
    paths = {name: out / "corpora" / f"{name}.parquet"
             for name in ("movielens", "docstrings", "synthetic")}
    paths["movielens"].parent.mkdir(parents=True, exist_ok=True)
    encoder = None
    asked = {"docstrings": n_docstrings, "synthetic": n_synthetic}  # the sized corpora
    for name, path in paths.items():
        if path.exists():
            rows = pl.scan_parquet(path).select(pl.len()).collect().item()
            if name in asked and rows != asked[name]:
                raise SystemExit(f"{path} holds {rows:,} rows, not the {asked[name]:,} asked "
                                 f"for: pass --{name} {rows} or delete it to rebuild")
            continue
        t = time.perf_counter()
        if name == "synthetic":
            world = generate_world(SyntheticWorldConfig(n_items=n_synthetic, n_events=1000, dim=384))
            write_embeddings(world.embeddings, path)
        else:
            encoder = encoder or minilm_text_encoder()
            items = load_movielens_100k()[0] if name == "movielens" \
                else load_docstring_corpus(n_docstrings, max_chars=200)
            write_embeddings(embed_items(items, [encoder], batch_size=256), path)
        print(f"built {name} embeddings in {time.perf_counter() - t:.0f}s -> {path}")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quantizer"))
    parser.add_argument("--docstrings", type=int, default=50_000)
    parser.add_argument("--synthetic", type=int, default=50_000)
    parser.add_argument("--corpora", default="movielens,docstrings,synthetic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale-mode", choices=["parallel", "cascade"], default=None,
                        help="mmtok's scales (default: MmDict's default, parallel)")
    args = parser.parse_args()
    paths = build_corpora(args.out, args.docstrings, args.synthetic)
    summary = []
    for name in args.corpora.split(","):
        print(f"\n== {name}")
        t = time.perf_counter()
        report = run_bench_quantizer(paths[name], args.out / name, scale_sizes=[16, 64, 256],
                                     seed=args.seed, scale_mode=args.scale_mode, progress=True)
        q = report["quantizers"]
        mm, rq = q["mmtok"], q["faiss_rq"]
        summary.append((name, report["dataset"]["rows"], mm, rq, time.perf_counter() - t))
    print("\n| corpus | rows | recall@10 mmtok / faiss_rq | kendall_tau mmtok / faiss_rq "
          "| rel_mse mmtok / faiss_rq | bench s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rows, mm, rq, secs in summary:
        print(f"| {name} | {rows} | {mm['recall_at_10']:.4f} / {rq['recall_at_10']:.4f} | "
              f"{mm['kendall_tau']:.4f} / {rq['kendall_tau']:.4f} | "
              f"{mm['rel_mse']:.4f} / {rq['rel_mse']:.4f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
