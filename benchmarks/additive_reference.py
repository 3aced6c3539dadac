"""How far faiss' own quantizers get at 36 bits on a corpus: the reference points for the
learned quantizer's bar (rel_mse <= 0.9x faiss RQ's, on held-out rows).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/additive_reference.py              # docstrings
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/additive_reference.py --corpus synthetic

The protocol of ``mmtok bench-quantizer``: its seeded split, fit on 80%, measured on the
held-out 20% with ``quantizer.metrics.quantizer_metrics``. Rows:

* faiss RQ in the bench's layout (16/16/64/64/256/256 codewords: 4+4+6+6+8+8 bits), beam 5
  (the bench's baseline), and the same codebooks encoded with wider beams;
* faiss RQ with six 64-word codebooks (6 x 6 bits), the only layout faiss' LSQ takes;
* faiss LSQ (additive quantization: all codebooks refit jointly, codes found by iterated
  conditional modes, Martinez et al. 2018), 6 x 6 bits.

The corpora are ``benchmarks/quantizer_corpora.py``'s (``runs/bench-quantizer/corpora``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from mmdata import read_embeddings
from mmtok.bench_quantizer import held_out_split
from quantizer.baselines import FaissRQ, unpack_codes
from quantizer.metrics import quantizer_metrics

CORPORA = Path("runs/bench-quantizer/corpora")


def main() -> None:
    import faiss

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="docstrings",
                        help=f"a corpus under {CORPORA} (docstrings, synthetic, movielens)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = CORPORA / f"{args.corpus}.parquet"
    if not path.exists():
        raise SystemExit(f"{path} not found: build it with benchmarks/quantizer_corpora.py")
    x = read_embeddings(path).vectors.astype(np.float32)
    fit_rows, held = held_out_split(len(x), args.seed)
    x_fit, x_held = np.ascontiguousarray(x[fit_rows]), np.ascontiguousarray(x[held])
    print(f"{args.corpus}: fit {len(x_fit)}, held out {len(x_held)}, width {x.shape[1]}")
    rows = []

    def measure(name: str, codes: np.ndarray, x_hat: np.ndarray, sizes: list[int],
                fit_s: float) -> None:
        m = quantizer_metrics(x_held, codes, x_hat, sizes, seed=args.seed)
        rows.append((name, m, fit_s))

    # faiss RQ as the bench fits it (beam 5), then its codebooks encoded with wider beams
    for name, sizes, beams in (("faiss RQ, bench layout", [16, 16, 64, 64, 256, 256],
                                (5, 16, 64)),
                               ("faiss RQ, 6 x 6 bits", [64] * 6, (5, 16))):
        rq = FaissRQ(sizes, beam_size=beams[0])
        start = time.perf_counter()
        rq.fit(x_fit)
        fit_s = time.perf_counter() - start
        for beam in beams:
            rq.index.rq.max_beam_size = beam
            codes = rq.encode(x_held)
            measure(f"{name}, encode beam {beam}", codes, rq.decode(codes), sizes, fit_s)
    lsq = faiss.LocalSearchQuantizer(x.shape[1], 6, 6)
    start = time.perf_counter()
    lsq.train(x_fit)
    fit_s = time.perf_counter() - start
    packed = lsq.compute_codes(x_held)
    measure("faiss LSQ, 6 x 6 bits", unpack_codes(packed, [6] * 6), lsq.decode(packed),
            [64] * 6, fit_s)
    base = rows[0][1]
    print("| quantizer | rel_mse | x faiss RQ (beam 5) | recall@10 | kendall_tau | fit s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m, fit_s in rows:
        print(f"| {name} | {m['rel_mse']:.4f} | {m['rel_mse'] / base['rel_mse']:.3f} | "
              f"{m['recall_at_10']:.4f} | {m['kendall_tau']:.4f} | {fit_s:.1f} |")


if __name__ == "__main__":
    main()
