"""``mmtok bench-quantizer``: every quantizer at equal total bits on one embedding file.

Seeded split of the rows into a fit set and a held-out set; each quantizer is fitted on
the fit set and measured on the held-out set (metrics as README's evaluation protocol
defines them). Writes ``metrics.json``, ``report.md`` and PNG plots.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from mmdata import read_embeddings
from quantizer import build_quantizers, quantizer_metrics, save_quantizer


def held_out_split(n: int, seed: int, holdout: float = 0.2, max_holdout: int = 10_000
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The bench's seeded split of n rows: (fit rows, held-out rows), both sorted; the
    held-out share is ``holdout`` of the rows, at least 20 and at most ``max_holdout``."""
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = min(max(int(round(n * holdout)), 20), max_holdout)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def fit_and_measure(q, x_fit: np.ndarray, x_held: np.ndarray, *, seed: int,
                    progress: bool) -> tuple[dict, np.ndarray]:
    """Fits ``q`` on ``x_fit``; returns its held-out metrics (``quantizer_metrics`` plus
    ``fit_s`` and ``encode_items_per_s``, timed after a warm-up encode) and codes."""
    t = time.perf_counter()
    q.fit(x_fit, progress=progress)
    fit_s = time.perf_counter() - t
    q.encode(x_held[:256])  # warm-up
    t = time.perf_counter()
    codes = q.encode(x_held)
    encode_s = time.perf_counter() - t
    metrics = quantizer_metrics(x_held, codes, q.decode(codes), q.codebook_sizes, seed=seed)
    metrics.update(fit_s=fit_s, encode_items_per_s=len(x_held) / max(encode_s, 1e-9))
    return metrics, codes


def run_bench_quantizer(embeddings_path: str | Path, out_dir: str | Path, *,
                        scale_sizes: list[int], levels: int = 2, holdout: float = 0.2,
                        max_holdout: int = 10_000, seed: int = 0, steps: int | None = None,
                        only: list[str] | None = None, stability: bool = True,
                        scale_mode: str | None = None, progress: bool = True) -> dict:
    """``stability``: also fit the seeded quantizers (mmtok, k-means, LSH) with seed + 1
    and report ``ids_changed_across_seeds``, the share of held-out items whose full code
    tuple changes (trained ID rows downstream are keyed by these tuples). ``scale_mode``:
    mmtok's scales "parallel" (default) or as one "cascade"."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    emb = read_embeddings(embeddings_path)
    n = len(emb)
    if n < 50:
        raise ValueError(f"{embeddings_path}: need at least 50 rows to benchmark, got {n}")
    fit_rows, held = held_out_split(n, seed, holdout, max_holdout)
    x_fit, x_held = emb.vectors[fit_rows], emb.vectors[held]
    quantizers = build_quantizers(scale_sizes, levels, seed=seed, steps=steps,
                                  scale_mode=scale_mode)
    if only:
        quantizers = {k: v for k, v in quantizers.items() if k in only}
    # ID stability: the seeded quantizers fitted again with another seed on the same rows
    refits = {name: q for name, q in build_quantizers(scale_sizes, levels, seed=seed + 1,
                                                      steps=steps, scale_mode=scale_mode).items()
              if name in ("mmtok", "kmeans", "lsh") and name in quantizers}
    results, codes_of = {}, {}
    for name, q in quantizers.items():
        metrics, codes = fit_and_measure(q, x_fit, x_held, seed=seed, progress=progress)
        metrics.update(n_codes=len(q.codebook_sizes), codebook_sizes=list(q.codebook_sizes))
        if hasattr(q, "decode_codewords"):  # what the IDs carry without the learned decoder
            metrics["codeword_sum"] = quantizer_metrics(x_held, codes, q.decode_codewords(codes),
                                                        q.codebook_sizes, seed=seed)
        if getattr(q, "training_summary", None):
            metrics["training"] = q.training_summary
        if stability and name in refits:
            again = refits[name].fit(x_fit, progress=False).encode(x_held)
            metrics["ids_changed_across_seeds"] = float((again != codes).any(1).mean())
        results[name] = metrics
        codes_of[name] = codes
        if progress:
            print(f"{name:>9}: bits {metrics['bits']:.0f}  rel_mse {metrics['rel_mse']:.4f}  "
                  f"recall@10 {metrics['recall_at_10']:.4f}  tau {metrics['kendall_tau']:.4f}  "
                  f"util {metrics['utilization']:.3f}  fit {metrics['fit_s']:.1f}s", flush=True)
        if name == "mmtok":
            save_quantizer(q, out / "mmtok_quantizer")
    report = {
        "dataset": {"path": str(embeddings_path), "rows": n, "dim": emb.dim,
                    "fit_rows": len(fit_rows), "holdout_rows": len(held), "seed": seed,
                    "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}"},
        "quantizers": results,
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    write_quantizer_report(out, report, codes_of)
    return report


def write_quantizer_report(out: Path, report: dict, codes_of: dict[str, np.ndarray]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = report["quantizers"]
    names = list(q)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, better in zip(axes, ("rel_mse", "recall_at_10", "kendall_tau"),
                               ("lower is better", "higher is better", "higher is better")):
        values = [q[n][key] for n in names]
        bars = ax.bar(names, values, color=["C3" if n == "mmtok" else "C0" for n in names])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_title(f"{key} ({better})")
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"Held-out quality at equal bits ({q[names[0]]['bits']:.0f} bits/item, "
                 "k-means: one codebook)")
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=110)
    plt.close(fig)

    if "mmtok" in codes_of:
        codes = codes_of["mmtok"]
        sizes = q["mmtok"]["codebook_sizes"]
        fig, axes = plt.subplots(1, len(sizes), figsize=(2.6 * len(sizes), 2.8), squeeze=False)
        for j, ax in enumerate(axes[0]):
            counts = np.sort(np.bincount(codes[:, j], minlength=sizes[j]))[::-1]
            ax.bar(np.arange(sizes[j]), counts, width=1.0)
            ax.set_title(f"code {j} ({sizes[j]} codes)", fontsize=9)
            ax.set_xlabel("code rank", fontsize=8)
        axes[0][0].set_ylabel("held-out items")
        fig.suptitle("mmtok code usage (sorted), held-out items")
        fig.tight_layout()
        fig.savefig(out / "code_usage.png", dpi=110)
        plt.close(fig)

    ds = report["dataset"]
    lines = [
        "# Quantizer benchmark", "",
        f"Embeddings `{ds['path']}`: {ds['rows']} rows x {ds['dim']}; fitted on {ds['fit_rows']}, "
        f"measured on {ds['holdout_rows']} held-out rows (seed {ds['seed']}).", "",
        "| quantizer | bits | rel_mse | recall@10 | kendall_tau | utilization | collision_rate "
        "| fit s | encode items/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in q.items():
        lines.append(f"| {name} | {m['bits']:.0f} | {m['rel_mse']:.4f} | {m['recall_at_10']:.4f} | "
                     f"{m['kendall_tau']:.4f} | {m['utilization']:.3f} | {m['collision_rate']:.4f} | "
                     f"{m['fit_s']:.1f} | {m['encode_items_per_s']:,.0f} |")
        if "codeword_sum" in m:
            c = m["codeword_sum"]
            lines.append(f"| {name} (codeword sum) | {c['bits']:.0f} | {c['rel_mse']:.4f} | "
                         f"{c['recall_at_10']:.4f} | {c['kendall_tau']:.4f} | "
                         f"{c['utilization']:.3f} | {c['collision_rate']:.4f} | | |")
    lines += ["", "`(codeword sum)`: the same codes rebuilt as the sum of their codewords, "
              "without the learned decoder - what the IDs themselves carry.", ""]
    for name, m in q.items():
        t = m.get("training")
        if t and t.get("codes_changed") is not None:
            lines.append(f"- {name} training: {t['steps_run']} steps, best at step "
                         f"{t['best_step']} on {t['valid_rows']} held-out fit rows; "
                         f"{t['codes_changed']:.1%} of those rows' code tuples moved away from "
                         f"the initialisation (per code: "
                         + ", ".join(f"{v:.0%}" for v in t["codes_changed_per_level"]) + ").")
    changed = {name: m["ids_changed_across_seeds"] for name, m in q.items()
               if "ids_changed_across_seeds" in m}
    if changed:
        lines.append("- ID stability, the share of held-out items whose full code tuple "
                     "changes when the quantizer is fitted again with another seed: "
                     + ", ".join(f"{n} {v:.1%}" for n, v in changed.items())
                     + " (faiss RQ and PQ take no seed: the same rows give the same codes).")
    lines += ["", "![quality](quality.png)", ""]
    if (out / "code_usage.png").exists():
        lines += ["![code usage](code_usage.png)", ""]
    lines += ["Definitions: `rel_mse = |X - X^|^2 / |X - mean(X)|^2`; `recall_at_10`: share of "
              "true top-10 cosine neighbours found in the top-10 on X^; `kendall_tau`: rank "
              "correlation of similarities to a fixed candidate sample, before vs after; "
              "`utilization`: min over codebooks of the share of codes used; `collision_rate`: "
              "share of items whose full code tuple another item shares.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
