"""Multi-scale residual encode throughput: mmtok's op against torch, torch.compile and faiss.

    PYTHONPATH=. .venv/bin/python benchmarks/encode.py --rows 20000 --out runs/bench-encode
    PYTHONPATH=. .venv/bin/python benchmarks/encode.py --rows 1000000 --device cuda   # GPU

Data: the synthetic world's content embeddings (rows x 384, unit norm). Codebooks: a
cascade of 3 scales x 2 levels (16/64/256 codes per scale, 36 bits per item) trained
by faiss' ``ResidualQuantizer`` (beam 1) on the first 10,000 rows; every method below
encodes with these SAME codebooks at beam 1 (greedy).

Setups:
  rq      x -> codes: faiss' problem exactly.
  mmdict  x -> linear encoder (384 x 384, bias) -> codes: MmDict's greedy encode. faiss
          gets the latent from torch (``F.linear``), whose time counts.

Methods:
  pytorch       the reference, ``kernels/pytorch`` (explicit residuals, level by level)
  compile       ``torch.compile`` of the reference
  mmtok         the dispatcher's pick for the device: ``EncodeKernel.CPU`` on CPU (one
                matmul over all codes, projection folded in), ``EncodeKernel.TRITON`` on GPU
  triton        the fused kernel, fp32 ``tl.dot`` ("ieee") and "tf32x3" (GPU only)
  faiss         ``ResidualQuantizer.compute_codes`` with ``max_beam_size = 1`` (CPU)
  and, with ``--beam 5``, faiss and mmtok's torch beam search at beam 5 (rq setup).

Floor of the fused kernel, per item (d input width, K total codes over all levels, J levels):
  FLOPs  F = 2 d K           one matmul of x against every code (the projection folded
                             into the codes; the cross-term adds, sum_j k_j * earlier
                             levels, are < 1% and not counted)
  bytes  B = 4 d + 8 J       read x once in fp32, write J int64 codes (the tables,
                             4 K d bytes plus the cross blocks, stay in L2)
  At d = 384, K = 704 (16, 16, 64, 64, 256, 256), J = 6: F = 540,672 FLOP, B = 1,584 B,
  341 FLOP/B: compute-bound on any GPU. floor(N) = max(N F / peak FLOP/s, N B / peak B/s).
  Peaks (dense): H100 SXM fp32 67 TFLOP/s, TF32 tensor 495 TFLOP/s, HBM 3.35 TB/s;
  H200 the same compute and 4.8 TB/s. The "ieee" kernel's floor uses the fp32 peak,
  "tf32x3" a third of the TF32 peak (three products); override with --peak-tflops/--peak-gbps.

Timing: every method is warmed up, then the methods run round-robin ``--repeats``
times (so a busy machine slows all of them alike); the table gives the median and
the range. "same codes" is the share of rows whose six codes equal the reference's.
Prints a markdown table, writes ``encode.json`` and ``encode.png`` under --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kernels import EncodeKernel, build_encode_tables, multiscale_encode
from kernels.pytorch.pt_multiscale_encode import pytorch_multiscale_encode
from mmdata import SyntheticWorldConfig, generate_world

SIZES = [16, 64, 256]
LEVELS = 2

# name fragment -> (fp32 TFLOP/s, TF32 tensor TFLOP/s, GB/s), dense
PEAKS = {"H200": (67.0, 495.0, 4800.0), "H100": (67.0, 495.0, 3350.0)}


def faiss_rq(x: np.ndarray, nbits: list[int], train_rows: int):
    import faiss

    vec = faiss.UInt64Vector()
    for b in nbits:
        vec.push_back(b)
    rq = faiss.ResidualQuantizer(x.shape[1], vec)
    rq.max_beam_size = 1
    rq.train(np.ascontiguousarray(x[:train_rows]))
    flat = faiss.vector_to_array(rq.codebooks).reshape(-1, x.shape[1]).copy()
    return rq, torch.from_numpy(flat)


def unpack(packed: np.ndarray, nbits: list[int]) -> torch.Tensor:
    """faiss' packed codes (LSB first) -> (n, J) int64."""
    bits = np.unpackbits(packed, axis=1, bitorder="little").astype(np.int64)
    cols, offset = [], 0
    for nb in nbits:
        cols.append(bits[:, offset:offset + nb] @ (1 << np.arange(nb, dtype=np.int64)))
        offset += nb
    return torch.from_numpy(np.stack(cols, 1))


def timed(fn, sync) -> float:
    sync()
    # faiss and torch each bring an OpenMP runtime whose idle threads spin for a while
    # after a parallel region; a short pause keeps one method's spinners off the next's cores
    time.sleep(0.05)
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch and faiss threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--beam", type=int, default=5, help="also time beam search (0: skip)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="fp32 peak")
    parser.add_argument("--peak-gbps", type=float, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-encode"))
    args = parser.parse_args()
    import faiss

    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    world = generate_world(SyntheticWorldConfig(n_items=args.rows, n_users=100, n_events=1000,
                                                dim=args.dim), progress=False)
    x_np = np.ascontiguousarray(world.embeddings.vectors)
    nbits = [int(np.log2(k)) for k in SIZES for _ in range(LEVELS)]
    rq, flat = faiss_rq(x_np, nbits, train_rows=min(10_000, args.rows))
    split = torch.split(flat, [k for k in SIZES for _ in range(LEVELS)])
    books = [[split[s * LEVELS + lv].to(device) for lv in range(LEVELS)] for s in range(len(SIZES))]
    g = torch.Generator().manual_seed(0)
    weight = torch.linalg.qr(torch.randn(args.dim, args.dim, generator=g))[0].to(device)
    bias = (0.01 * torch.randn(args.dim, generator=g)).to(device)
    x = torch.from_numpy(x_np).to(device)
    d, n_codes, n_levels = args.dim, sum(k for k in SIZES for _ in range(LEVELS)), len(nbits)
    flop_item, byte_item = 2 * d * n_codes, 4 * d + 8 * n_levels

    setups = {"rq": None, "mmdict": (weight, bias)}
    methods: dict[tuple[str, str], object] = {}
    for setup, proj in setups.items():
        tables = build_encode_tables(books, proj, "cascade")
        methods[setup, "pytorch"] = lambda p=proj: pytorch_multiscale_encode(x, books, p, "cascade")
        if not args.no_compile:
            compiled = torch.compile(pytorch_multiscale_encode)
            methods[setup, "compile"] = lambda p=proj, c=compiled: c(x, books, p, "cascade")
        kernel = EncodeKernel.TRITON if on_gpu else EncodeKernel.CPU
        methods[setup, f"mmtok ({kernel.value})"] = lambda p=proj, t=tables, k=kernel: \
            multiscale_encode(x, books, projection=p, kernel=k, tables=t)
        if on_gpu:
            from kernels.triton.triton_multiscale_encode import triton_multiscale_encode

            methods[setup, "triton tf32x3"] = lambda t=tables: \
                triton_multiscale_encode(x, t, precision="tf32x3")
        else:
            methods[setup, "triton"] = None  # no GPU: not measured
        if proj is None:
            methods[setup, "faiss rq beam 1"] = lambda: unpack(rq.compute_codes(x_np), nbits)
        else:
            def faiss_projected(p=proj):
                z = F.linear(x, *p).cpu().numpy()
                return unpack(rq.compute_codes(z), nbits)

            methods[setup, "faiss rq beam 1 (torch projects)"] = faiss_projected
    if args.beam > 1:
        from quantizer.mmdict import MmDictConfig, MultiScaleResidualQuantizer

        net = MultiScaleResidualQuantizer(d, MmDictConfig(beam_size=args.beam)).to(device)
        with torch.no_grad():
            for j, book in enumerate(b for levels in books for b in levels):
                net.codebooks[j].copy_(book)

        def faiss_beam():
            rq.max_beam_size = args.beam
            try:
                return unpack(rq.compute_codes(x_np), nbits)
            finally:
                rq.max_beam_size = 1

        methods["rq", f"faiss rq beam {args.beam}"] = faiss_beam
        methods["rq", f"mmtok beam {args.beam} (torch search_codes)"] = \
            lambda: net.search_codes(x)

    print(f"device: {torch.cuda.get_device_name() if on_gpu else platform.processor() or 'cpu'}"
          f", torch {torch.__version__}, threads {torch.get_num_threads()}, faiss threads "
          f"{faiss.omp_get_max_threads()}; {args.rows} x {d}, codebooks {SIZES} x {LEVELS}")
    reference = {s: pytorch_multiscale_encode(x, books, p, "cascade").cpu() for s, p in setups.items()}
    agreement, failed = {}, {}
    for key, fn in list(methods.items()):
        if fn is None:
            continue
        t = time.perf_counter()
        try:
            with torch.no_grad():
                codes = fn().cpu()  # warm-up (and compile)
        except Exception as err:  # a method that cannot run here is reported, not fatal
            failed[key] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
            methods[key] = None
            continue
        agreement[key] = (codes == reference[key[0]]).all(1).float().mean().item()
        print(f"  warm-up {key[0]:>6} / {key[1]}: {time.perf_counter() - t:.1f}s", flush=True)
    times = {key: [] for key, fn in methods.items() if fn is not None}
    with torch.no_grad():
        for _ in range(args.repeats):
            for key in times:
                times[key].append(timed(methods[key], sync))

    results = []
    faiss_ips = {}
    for key in methods:
        row = {"setup": key[0], "method": key[1]}
        if key in times:
            ts = np.array(times[key])
            row.update(items_per_s=args.rows / np.median(ts), lo=args.rows / ts.max(),
                       hi=args.rows / ts.min(), same_codes=agreement[key])
            if key[1].startswith("faiss rq beam 1"):
                faiss_ips[key[0]] = row["items_per_s"]
            if on_gpu:
                row["gb_per_s"] = byte_item * row["items_per_s"] / 1e9
                row["tflop_per_s"] = flop_item * row["items_per_s"] / 1e12
        else:
            row["note"] = failed.get(key, "not measured (no GPU in this run)")
        results.append(row)

    peak = None
    if on_gpu:
        name = torch.cuda.get_device_name()
        known = next((v for k, v in PEAKS.items() if k in name), None)
        fp32, tf32, gbps = known or (None, None, None)
        fp32 = args.peak_tflops or fp32
        gbps = args.peak_gbps or gbps
        if fp32 and gbps:
            peak = {"fp32_tflops": fp32, "tf32_tflops": tf32, "gbps": gbps}
    print("\n| setup | method | items/s (median) | range | vs faiss beam 1 | same codes"
          + (" | GB/s | TFLOP/s | % of floor" if on_gpu else "") + " |")
    print("|---|---|---:|---:|---:|---:" + ("|---:|---:|---:" if on_gpu else "") + "|")
    for row in results:
        if "items_per_s" not in row:
            print(f"| {row['setup']} | {row['method']} | {row['note']} |  |  |  |"
                  + (" |  |  |" if on_gpu else ""))
            continue
        ratio = row["items_per_s"] / faiss_ips[row["setup"]] if row["setup"] in faiss_ips else 0
        line = (f"| {row['setup']} | {row['method']} | {row['items_per_s']:,.0f} | "
                f"{row['lo']:,.0f}–{row['hi']:,.0f} | {ratio:.2f}x | {100 * row['same_codes']:.2f}%")
        if on_gpu:
            floor_note = ""
            if peak:
                tf = peak["fp32_tflops"] if "tf32x3" not in row["method"] else \
                    (peak["tf32_tflops"] or 3 * peak["fp32_tflops"]) / 3
                floor_items = min(tf * 1e12 / flop_item, peak["gbps"] * 1e9 / byte_item)
                row["pct_of_floor"] = 100 * row["items_per_s"] / floor_items
                floor_note = f"{row['pct_of_floor']:.0f}%"
            line += f" | {row['gb_per_s']:.1f} | {row['tflop_per_s']:.2f} | {floor_note}"
        print(line + " |")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "encode.json").write_text(json.dumps({
        "rows": args.rows, "dim": d, "sizes": SIZES, "levels": LEVELS, "device": str(device),
        "threads": torch.get_num_threads(), "flop_per_item": flop_item,
        "bytes_per_item": byte_item, "peak": peak, "results": results}, indent=2))
    plot(results, args.out / "encode.png", f"{args.rows} x {d}, {str(device)}")
    print(f"\nwrote {args.out / 'encode.json'} and {args.out / 'encode.png'}")


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if "items_per_s" in r]
    labels = [f"{r['setup']}: {r['method']}" for r in rows]
    values = [r["items_per_s"] for r in rows]
    colors = ["C3" if r["method"].startswith("mmtok") else
              "C0" if r["method"].startswith("faiss") else "C7" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    bars = ax.barh(labels[::-1], values[::-1], color=colors[::-1])
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values[::-1]], fontsize=8, padding=3)
    ax.set_xlabel("items / s (median; higher is better)")
    ax.set_title(f"Multi-scale residual encode, same codebooks ({title})")
    ax.set_xlim(0, max(values) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
