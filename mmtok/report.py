"""The offline report a ranking engineer forwards: tables and plots from ``metrics.json``."""

from __future__ import annotations

import math
from pathlib import Path

from ranker.experiment import BOOTSTRAP_RESAMPLES, LIFT_LOST_BAR
from ranker.model import RankerConfig

# How a report names RankerConfig.table_optimizer.
TABLE_OPTIMIZER_NAMES = {"adagrad": "exact Adagrad (a sum per element)",
                    "rowwise_adagrad": "row-wise Adagrad (a sum per row)"}
# How a report names RankerConfig.prefix_ngrams.
NGRAM_WORDS = {"none": "", "per_scale": " plus each scale's prefix n-grams",
               "chain": " plus the prefix n-grams of the whole residual chain"}
# How a report names RankerConfig.code_pooling.
CONTENT_FEATURES = {
    "summed": "as one multi-hot feature (their embeddings summed into one interaction slot)",
    "per_scale": "as one multi-hot feature per scale (one interaction slot each)",
    "per_feature": "as one feature each (one interaction slot each)",
}


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def plot_variant_auc(variants: dict[str, dict], path: Path, *, warmup_epochs: int = 0,
                     curves_title: str = "Training curves") -> Path:
    """Test AUC by variant (all / warm / cold) beside the validation curves. The curves'
    scale is set by the epochs after the table warm-up, which is shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(variants)
    fig, (ax_auc, ax_curve) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.27
    for k, (key, label) in enumerate([("auc", "all"), ("auc_warm", "warm items"),
                                      ("auc_cold", "cold items")]):
        values = [variants[n].get(key, float("nan")) for n in names]
        xs = [i + (k - 1) * width for i in range(len(names))]
        ax_auc.bar(xs, values, width, label=label)
    finite = [variants[n][k] for n in names for k in ("auc", "auc_warm", "auc_cold")
              if not math.isnan(variants[n].get(k, float("nan")))]
    ax_auc.set_ylim(max(0.45, min(finite) - 0.03), max(finite) + 0.05)
    ax_auc.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax_auc.set_xticks(range(len(names)), names, rotation=20)
    ax_auc.set_ylabel("test AUC")
    ax_auc.set_title("Test AUC by variant")
    ax_auc.legend(fontsize=8, ncol=3, loc="upper center")
    for name in names:
        history = variants[name].get("history", [])
        ax_curve.plot([h["epoch"] for h in history], [h["valid_auc"] for h in history],
                      marker="o", label=name)
    learning = [h["valid_auc"] for n in names for h in variants[n].get("history", [])
                if h["epoch"] > warmup_epochs]
    if warmup_epochs:
        ax_curve.axvspan(0.5, warmup_epochs + 0.5, color="grey", alpha=0.15,
                         label="tables held still")
        if learning:
            pad = 0.15 * (max(learning) - min(learning)) + 0.002
            ax_curve.set_ylim(min(learning) - pad, max(learning) + pad)
    ax_curve.xaxis.get_major_locator().set_params(integer=True)
    ax_curve.set_xlabel("epoch")
    ax_curve.set_ylabel("validation AUC")
    ax_curve.set_title(curves_title)
    ax_curve.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_comparisons(intervals: dict[str, dict], path: Path) -> Path:
    """Each comparison's value and 95% interval (test rows and seeds), one panel per
    scale: lift lost on all rows (with the 1% bar), on cold rows, content lift lost, AUC
    differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("lift lost, all rows: % of dense's lift (< 0: beats dense)", 100,
               lambda e: e["measure"] == "lift_lost" and e["rows"] == "all"),
              ("lift lost, cold rows: % of dense's lift", 100,
               lambda e: e["measure"] == "lift_lost" and e["rows"] == "cold"),
              ("content lift lost: % of what content adds over no_content", 100,
               lambda e: e["measure"] == "content_lift_lost"),
              ("AUC difference (> 0: the first variant is better)", 1,
               lambda e: e["measure"] == "auc_diff")]
    panels = [(title, scale, [k for k, e in intervals.items() if pick(e)])
              for title, scale, pick in panels]
    panels = [p for p in panels if p[2]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 2.8), squeeze=False)
    for ax, (title, scale, keys) in zip(axes[0], panels):
        for i, key in enumerate(keys):
            e = intervals[key]
            ax.plot([e["low"] * scale, e["high"] * scale], [i, i], color="tab:blue", lw=2)
            ax.plot(e["value"] * scale, i, "o", color="tab:blue")
        ax.axvline(0, color="grey", lw=0.8)
        if "all rows" in title:
            ax.axvline(LIFT_LOST_BAR * 100, color="tab:red", lw=0.8, ls="--", label="1% bar")
            ax.legend(fontsize=7, loc="best")
        entries = [intervals[k] for k in keys]
        ax.set_yticks(range(len(keys)), [f"{e['variant']} vs {e['reference']}\n{e['rows']} rows"
                                         for e in entries], fontsize=7)
        ax.set_ylim(len(keys) - 0.4, -0.6)  # first comparison on top
        ax.set_title(title, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("Value and 95% interval over the test rows and seeds (bootstrap)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _measure(entry: dict, value: float) -> str:
    """A comparison's value in its unit: lift lost in percent, AUC differences in AUC."""
    return f"{value * 100:+.2f}%" if entry["measure"] != "auc_diff" else f"{value:+.4f}"


def _interval(entry: dict) -> str:
    return f"{_measure(entry, entry['low'])} to {_measure(entry, entry['high'])}"


def _seed_gaps(entry: dict, variants: dict) -> list[float]:
    """Per seed i, AUC of the comparison's variant minus its reference's (seed i of each),
    on its rows; [] with one seed."""
    key = "auc_cold_seeds" if entry["rows"] == "cold" else "auc_seeds"
    v, r = variants[entry["variant"]].get(key, []), variants[entry["reference"]].get(key, [])
    return [a - b for a, b in zip(v, r)] if len(v) > 1 and len(v) == len(r) else []


def _seeds_agree(gaps: list[float]) -> bool:
    return all(g > 0 for g in gaps) or all(g < 0 for g in gaps)


def _resolved(entry: dict, variants: dict) -> bool:
    """A gap is clear when its interval (test rows and seeds) leaves out zero and every
    seed puts the two variants in the same order."""
    return not entry["low"] <= 0 <= entry["high"] and _seeds_agree(_seed_gaps(entry, variants))


def _interval_scope(metrics: dict) -> str:
    seeds = len(metrics.get("ranker_seeds") or [])
    return f"the test rows and {seeds} seeds" if seeds > 1 else "the test rows (one seed)"


def _sureness(key: str, metrics: dict) -> str:
    """``95% interval over ... a to b; `V` ahead of `R` on p% of resamples; clear`` (or
    why not), or "" when the comparison has no interval."""
    entry = (metrics.get("intervals") or {}).get(key)
    if entry is None:
        return ""
    variants = metrics["variants"]
    verdict = "clear" if _resolved(entry, variants) else "not resolved"
    gaps = _seed_gaps(entry, variants)
    if not _seeds_agree(gaps):
        verdict += f": the seeds disagree ({', '.join(f'{g:+.4f}' for g in gaps)} AUC)"
    return (f"95% interval over {_interval_scope(metrics)} {_interval(entry)}; "
            f"`{entry['variant']}` ahead of `{entry['reference']}` on "
            f"{entry['p_favourable']:.0%} of resamples; **{verdict}**")


def _in_brackets(text: str) -> str:
    return f" ({text})" if text else ""


def _content_measurable(metrics: dict) -> bool:
    """Whether ``dense`` clearly beats ``no_content``: only then is a share of content's
    lift (``content_lift_lost``) a number rather than a ratio over noise."""
    gap = (metrics.get("intervals") or {}).get("dense_vs_no_content")
    return gap is not None and _resolved(gap, metrics["variants"])


def _content_lift(metrics: dict) -> list[str]:
    """The summary's first line: whether content's lift over ``no_content`` is there to
    measure, and if so, what share of it each variant loses."""
    intervals, loss = metrics.get("intervals") or {}, metrics.get("quantization_loss") or {}
    gap = intervals.get("dense_vs_no_content")
    if gap is None:
        return []
    if not _content_measurable(metrics):
        return [f"- **Content's lift cannot be measured on this data**: `dense` − `no_content` is "
                f"{gap['value']:+.4f} AUC ({_sureness('dense_vs_no_content', metrics)}), so a "
                "share of it (`content_lift_lost`) would be a ratio over noise and is not given."]
    shares = [f"`{variant}` {loss[key] * 100:+.1f}%" for key, variant in
              (("content_lift_lost", "ids"), ("content_lift_lost_recon", "recon"),
               ("content_lift_lost_cold", "ids, cold rows")) if key in loss]
    line = (f"- Content adds {gap['value']:+.4f} AUC over `no_content` (`dense`; "
            f"{_sureness('dense_vs_no_content', metrics)}).")
    if shares:
        line += f" Share of it lost (`content_lift_lost`): {', '.join(shares)}."
    return [line]


def _summary(metrics: dict) -> list[str]:
    """The report's answers in sentences, for whichever variants ran."""
    v, loss = metrics["variants"], metrics.get("quantization_loss") or {}
    intervals = metrics.get("intervals") or {}
    noise = max((m.get("auc_std", 0.0) for m in v.values()), default=0.0)
    out = _content_lift(metrics)
    oracle = metrics.get("oracle")
    if oracle and "gap_closed" in oracle:
        closed = ", ".join(f"`{name}` {share:.0%}" for name, share in oracle["gap_closed"].items()
                           if name != "no_content")
        out.append(f"- The oracle (the world's own click logit) reaches AUC {oracle['auc']:.4f} "
                   f"(cold rows {oracle['auc_cold']:.4f}); share of the gap from `no_content` "
                   f"to it that each variant closes: {closed}.")
    if "lift_lost_recon" in loss:
        lost = loss["lift_lost_recon"]
        ok = "under" if lost < LIFT_LOST_BAR else "over"
        line = (f"- Content rebuilt from the IDs (`recon`) {'loses' if lost > 0 else 'gains'} "
                f"**{abs(lost) * 100:.2f}%** of the dense embedding's lift, {ok} the "
                f"{LIFT_LOST_BAR:.0%} bar for the loss.")
        entry = intervals.get("lift_lost_recon")
        if entry:
            line += (f" {_interval_scope(metrics).capitalize()} leave it anywhere from "
                     f"{_interval(entry)} (95%, bootstrap); it is under the bar on "
                     f"{entry['p_under_bar']:.0%} of resamples.")
        out.append(line)
    if "lift_lost" in loss:
        verb = "lose" if loss["lift_lost"] > 0 else "gain"
        out.append(f"- The IDs alone (`ids`) {verb} **{abs(loss['lift_lost']) * 100:.2f}%** of "
                   f"the dense lift (AUC {v['ids']['auc']:.4f} vs {v['dense']['auc']:.4f}"
                   f"{'; ' + sure if (sure := _sureness('lift_lost', metrics)) else ''}).")
    if "ids_dense" in v and "dense" in v:
        diff = v["ids_dense"]["auc"] - v["dense"]["auc"]
        out.append(f"- IDs beside the dense vector (`ids_dense`): {diff:+.4f} AUC over `dense`"
                   f"{_in_brackets(_sureness('ids_dense_vs_dense', metrics))}.")
    if "ids" in v and "no_content" in v and v["ids"].get("auc_cold") is not None:
        out.append(f"- Cold items: `ids` {v['ids']['auc_cold']:.4f} vs `no_content` "
                   f"{v['no_content']['auc_cold']:.4f} AUC"
                   f"{_in_brackets(_sureness('ids_vs_no_content_cold', metrics))}.")
    moved = ((metrics.get("quantizers") or {}).get("task_mmtok") or {}).get(
        "tuples_differ_from_content")
    if "task_ids" in v and "ids" in v and moved == 0:
        out.append("- Task-aware tokens (`task_ids`): nothing the training events taught "
                   "generalised to held-out items, so the tokenizer kept the content-only IDs "
                   "(`task_ids` is `ids`).")
    elif "task_ids" in v and "ids" in v:
        out.append(f"- Task-aware tokens (`task_ids`, the encoder aligned with the training "
                   f"events' {_task_signal(metrics)}): "
                   f"{v['task_ids']['auc'] - v['ids']['auc']:+.4f} AUC over content-only `ids`"
                   f"{_in_brackets(_sureness('task_ids_vs_ids', metrics))}; on cold rows "
                   f"{v['task_ids']['auc_cold'] - v['ids']['auc_cold']:+.4f}"
                   f"{_in_brackets(_sureness('task_ids_vs_ids_cold', metrics))}.")
    throughput = metrics.get("throughput") or {}
    if "ids" in (throughput.get("ratio") or {}):
        one_pass = v["ids"]["train_examples_per_s"] / v["no_content"]["train_examples_per_s"]
        out.append(f"- Training throughput of `ids` is **{throughput['ratio']['ids']:.2f}x** "
                   f"`no_content`'s (median over {throughput['rounds']} rounds of "
                   f"{throughput['steps']}-step windows taken in turn, the order reversed "
                   f"every round, so load on a shared machine hits both alike; "
                   f"{throughput['median']['ids']:,.0f} against "
                   f"{throughput['median']['no_content']:,.0f} examples/s; the training "
                   f"runs themselves, one pass each, gave {one_pass:.2f}x).")
    elif "ids" in v and "no_content" in v and v["no_content"].get("train_examples_per_s"):
        ratio = v["ids"]["train_examples_per_s"] / v["no_content"]["train_examples_per_s"]
        out.append(f"- Training throughput of `ids` is {ratio:.2f}x `no_content`'s in this run "
                   "(one pass each, on a shared machine).")
    if noise:
        out.append(f"- Seed-to-seed spread of AUC is up to {noise:.4f}: differences smaller "
                   "than that are not resolved by this run.")
    return ["## Summary", "", *out, ""] if out else []


def _task_signal(metrics: dict) -> str:
    task = (metrics.get("quantizers") or {}).get("task_mmtok") or {}
    signal = ((task.get("training") or {}).get("task_alignment") or {}).get("signal", "")
    return {"clicks": "clicks (a small click model)",
            "co_engagement": "co-engagement (items clicked by the same users)"}.get(signal,
                                                                                  "behaviour")


def _task_section(metrics: dict) -> list[str]:
    """What task-aware tokens cost and when they pay, for a ranking engineer."""
    quantizers = metrics.get("quantizers") or {}
    task, content = quantizers.get("task_mmtok"), quantizers.get("mmtok")
    if not task or not content:
        return []
    align = (task.get("training") or {}).get("task_alignment") or {}
    tuned = (task.get("training") or {}).get("task_finetune") or {}
    entry = (metrics.get("intervals") or {}).get("task_ids_vs_ids_cold")
    paid = entry is not None and _resolved(entry, metrics["variants"]) and entry["value"] > 0
    lines = _table_section(
        "Task-aware tokens",
        "They pay when what makes users click is a part of the content that the content's own "
        "variance does not single out: aligned with the training events, the encoder spends "
        "the codes on that part, so a new ad shares IDs with the warm ads that click like it "
        "and inherits what the ranker learned of them"
        + (" (here: a clear gain on cold rows)." if paid else
           " (here nothing in the training events generalised to held-out items: the IDs "
           "are the content-only ones)." if task.get("tuples_differ_from_content") == 0 else
           " (here the cold rows show no clear gain, see the summary).")
        + f" They cost one more quantizer fit, on the training events ({task['fit_s']:.0f} s "
        f"against {content['fit_s']:.0f} s for content-only IDs), and nothing in serving: the "
        "encoder is still one linear map in the same encode op, and a new ad's IDs still come "
        "from its embedding alone.",
        ["tokens", "fit s", "encode items/s", "rel_mse", "recall@10", "tuples moved"],
        numeric=5)
    for name, q in (("content only (`ids`)", content), ("task-aware (`task_ids`)", task)):
        moved = q.get("tuples_differ_from_content")
        lines.append(f"| {name} | {q['fit_s']:.1f} | {q['encode_items_per_s']:,.0f} | "
                     f"{_fmt(q['rel_mse'])} | {_fmt(q['recall_at_10'])} | "
                     f"{'-' if moved is None else f'{moved:.0%}'} |")
    if align:
        if "skipped" in align:
            stop = f"skipped: {align['skipped']}"
        elif "id_check" in align:
            check = align["id_check"]
            stop = (f"codes cut in the click model's metric ({align['tuples_moved']:.0%} of "
                    f"the tuples re-cut) {'kept' if align['kept'] else 'not kept'}: a click "
                    f"model that knows items by their IDs alone scored the held-out items' "
                    f"clicks {check['metric_loss']:.4f} with them against "
                    f"{check['content_loss']:.4f} with the content's codes")
        else:
            stop = (f"best of {align['steps_run']} steps at step {align['best_step']}, held-out "
                    f"items' loss {align['valid_loss_init']:.4f} -> "
                    f"{align['valid_loss_best']:.4f}, {align['variance_moved']:.0%} of the "
                    "latent's variance moved between axes")
        lines += ["", f"Alignment ({align['signal']}, on {align['held_out_items']:,} held-out "
                  f"items' events to stop): {stop}.{_finetune_words(tuned)} \"tuples moved\": "
                  "items whose code tuple differs from the content-only one. rel_mse and "
                  "recall@10 measure the content kept, on items without training events."]
    return lines


def _finetune_words(tuned: dict) -> str:
    """What the click loss through the codes did, for the task section."""
    if not tuned or tuned.get("skipped"):
        return ""
    check = tuned.get("id_check")
    if check is None:
        return (" The click loss through the codes found nothing better than the codes as "
                "they are on the held-out items." if not tuned.get("best_step") else
                f" The click loss through the codes kept step {tuned['best_step']}.")
    verdict = "kept" if check["kept"] else "rolled back"
    return (f" The click loss through the codes found a better step ({tuned['valid_loss_init']:.4f}"
            f" -> {tuned['valid_loss_best']:.4f}); an ID-only click model trained from scratch "
            f"scored the held-out items' clicks {check['content_loss']:.4f} with the content "
            f"codes and {check['moved_loss']:.4f} with the moved ones, so the move was {verdict}.")


def _side_by_side(workers: int | None) -> str:
    """How the runs were scheduled (a bench before ``train_workers`` has no entry)."""
    if not workers:
        return ""
    return ", one run at a time" if workers == 1 else f", {workers} runs side by side"


def _user_cross(column: str) -> str:
    """The report's words for ``RankerConfig.user_code_cross``."""
    if column == "none":
        return ""
    named = "the coarsest content ID" if column == "coarsest" else f"the content ID `{column}`"
    return f", the user crossed with {named} (ID variants without the dense vector's slot)"


def _table_section(title: str, text: str, columns: list[str], numeric: int) -> list[str]:
    """A report section's heading, paragraph and table head; the last ``numeric``
    columns hold numbers (right-aligned)."""
    aligns = ["---"] * (len(columns) - numeric) + ["---:"] * numeric
    return ["", f"## {title}", "", text, "", f"| {' | '.join(columns)} |",
            f"|{'|'.join(aligns)}|"]


def write_ranking_report(out_dir: Path, metrics: dict, *, title: str) -> Path:
    """Writes ``out_dir/report.md`` (and ``variant_auc.png``) from a metrics dict."""
    variants = metrics["variants"]
    seeds = metrics.get("ranker_seeds") or []
    # What the report says of the ranker: the config it trained with, defaults included.
    ranker = RankerConfig(**metrics["ranker"]) if metrics.get("ranker") else None
    plot = plot_variant_auc(
        variants, out_dir / "variant_auc.png",
        warmup_epochs=ranker.table_warmup_epochs if ranker else 0,
        curves_title=f"Training curves (seed {seeds[0]} of {len(seeds)})" if len(seeds) > 1
        else "Training curves")
    ds = metrics["dataset"]
    split = ds.get("split", {})
    lines = [f"# {title}", ""]
    lines += [
        f"Dataset **{ds['name']}**: {ds.get('items', '-')} items, {ds.get('events', '-')} events; "
        f"content embedding width {ds.get('embedding_dim', '-')} ({ds.get('encoder', '-')}).",
        "",
        "Evaluation protocol: time split 80/10/10 by `ts`, plus a seeded 10% of items held out "
        "(their pre-test events dropped) so they reach the model cold. "
        f"Test rows: {split.get('test', {}).get('rows', '-')}, of which cold: "
        f"{split.get('test', {}).get('cold_rows', '-')}.",
        "",
    ]
    lines += _summary(metrics)
    if ranker:
        content_slot = ("; the dense content vector with an interaction slot of its own"
                        if ranker.content_slot else "")
        stale = ("clearly worse than the best, by two standard errors"
                 if ranker.patience_counts == "clearly_worse" else "without a better AUC")
        meda = (", and restarted from that point every later epoch (MEDA)"
                if ranker.table_reinit_each_epoch else
                ", and, once patience first runs out, restarted from that point every later "
                "epoch under the best step's MLPs (MEDA on plateau)"
                if ranker.table_reinit_on_plateau else "")
        lines += [
            f"Ranker: {ranker.interaction.upper()} over TorchRec tables of width "
            f"{ranker.embedding_dim}; content IDs"
            f"{NGRAM_WORDS[ranker.prefix_ngrams]} "
            f"{CONTENT_FEATURES[ranker.code_pooling]}"
            f"{_user_cross(ranker.user_code_cross)}, content-ID rows initialised "
            f"`{ranker.code_init}` and id rows at {ranker.id_init_scale:g}x TorchRec's "
            f"uniform range{content_slot}; tables updated by "
            f"{TABLE_OPTIMIZER_NAMES[ranker.table_optimizer]}; "
            f"global batch {ranker.batch_size}, "
            f"at most {ranker.epochs} epochs with early stopping on validation AUC "
            f"(patience {ranker.patience} validations {stale}), the tables held still for "
            f"{_epochs(ranker.table_warmup_epochs)} while the MLPs warm up{meda}; "
            f"{metrics.get('nproc', 1)} process(es) per run"
            f"{_side_by_side(metrics.get('train_workers'))}.",
            "",
        ]
    q = metrics.get("quantizer")
    if q:
        lines += [
            "## Content IDs",
            "",
            f"Quantizer `{q['kind']}`: {len(q['code_names'])} IDs per item "
            f"({', '.join(q['code_names'])}), codebook sizes {q['codebook_sizes']}, "
            f"{q['bits']:.0f} bits per item."
            + (f" Fitted on the {q['fit_items']:,} items with training events; measured on "
               f"{q['measured_items']:,} {q['measured_on']}." if "fit_items" in q else ""),
            "",
            "| rel_mse | recall@10 | kendall_tau | utilization | collision_rate |",
            "|---:|---:|---:|---:|---:|",
            f"| {_fmt(q['rel_mse'])} | {_fmt(q['recall_at_10'])} | {_fmt(q['kendall_tau'])} | "
            f"{_fmt(q['utilization'])} | {_fmt(q['collision_rate'])} |",
            "",
        ]
    lines += [
        "## Ranking quality by variant",
        "",
        "Same architecture and budget; variants differ only in how item content enters: "
        "`no_content` (user/item/context ids only), `dense` (the embedding as dense input), "
        "`recon` (the embedding rebuilt from the IDs), `ids` (the IDs as sparse features), "
        "`ids_dense` (both), `task_ids` (task-aware IDs: the quantizer aligned with the "
        "training events first).",
        "",
        *([f"Means over ranker seeds {metrics['ranker_seeds']} (AUC ± standard deviation "
           "across seeds, and each seed's AUC).", ""] if len(seeds) > 1 else []),
        "| variant | AUC | AUC per seed | AUC warm | AUC cold | log loss | NE | train ex/s "
        "| best epoch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in variants.items():
        spread = f" ± {m['auc_std']:.4f}" if "auc_std" in m else ""
        per_seed = " / ".join(f"{a:.4f}" for a in m.get("auc_seeds", [m["auc"]]))
        lines.append(
            f"| {name} | {_fmt(m['auc'])}{spread} | {per_seed} "
            f"| {_fmt(m.get('auc_warm'))} | {_fmt(m.get('auc_cold'))} "
            f"| {_fmt(m['logloss'])} | {_fmt(m['ne'])} | {m.get('train_examples_per_s', 0):,.0f} "
            f"| {_fmt(m.get('best_epoch', '-'), 2)} |"
        )
    lines += _task_section(metrics)
    loss = metrics.get("quantization_loss") or {}
    if loss:
        lines += _table_section(
            "Quantization loss",
            "`lift lost = (AUC_dense - AUC_V) / (AUC_dense - 0.5)`: the share of the dense model's "
            "lift over chance that variant V loses; negative means V beats dense. "
            "`content_lift_lost` divides by `AUC_dense - AUC_no_content` instead: the share "
            "of what content adds that V loses (meaningful only where `dense` clearly beats "
            "`no_content`, see the summary).",
            ["measure", "compares", "value"], numeric=1)
        labels = {"lift_lost": "ids vs dense", "lift_lost_cold": "ids vs dense, cold items",
                  "lift_lost_recon": "recon vs dense (MmDict's \"< 1% on the task\")",
                  "content_lift_lost": "ids vs dense, over no_content",
                  "content_lift_lost_cold": "ids vs dense, over no_content, cold items",
                  "content_lift_lost_recon": "recon vs dense, over no_content"}
        measurable = _content_measurable(metrics)
        for key, value in loss.items():
            if key.startswith("content_") and not measurable:
                continue  # a ratio over noise (the summary says so)
            variant = key.removeprefix("content_lift_lost_").removeprefix("lift_lost_")
            named = f"{variant} vs dense" + (", over no_content" if key.startswith("content_") else "")
            lines.append(f"| `{key}` | {labels.get(key, named)} | {value * 100:+.2f}% |")
    intervals = {k: e for k, e in (metrics.get("intervals") or {}).items()
                 if _content_measurable(metrics) or e["measure"] != "content_lift_lost"}
    if intervals:
        lines += _table_section(
            "How sure the test set and the seeds make these",
            f"Every variant scored on the same {BOOTSTRAP_RESAMPLES:,} resamples of the test "
            "rows (drawn with replacement): a paired bootstrap, so each comparison keeps its "
            "pairing. Each resample also draws every variant's training seeds with "
            "replacement and averages the drawn seeds' AUCs, so the interval covers both "
            "what the test set's size and what the training seed leave open (with one seed, "
            "the test rows only). \"Ahead\" is the share of resamples on which the first "
            "variant beats the second; a gap is called clear only when its interval leaves "
            "out zero and every seed orders the two variants the same way.",
            ["comparison", "rows", "value", "95% interval", "ahead on"], numeric=3)
        for key, e in intervals.items():
            lines.append(f"| `{key}`: {e['variant']} vs {e['reference']} | {e['rows']} | "
                         f"{_measure(e, e['value'])} | {_interval(e)} | "
                         f"{e['p_favourable']:.0%} |")
        if len(seeds) > 1:
            lines += ["", "Every seed's gap (AUC of the variant minus the reference's, seed "
                      "by seed): " + "; ".join(
                          f"`{key}` {', '.join(f'{g:+.4f}' for g in gaps)}"
                          for key, e in intervals.items()
                          if e["measure"] == "auc_diff" and (gaps := _seed_gaps(e, variants)))]
        figure = plot_comparisons(intervals, out_dir / "comparisons.png")
        lines += ["", f"![Comparisons with their intervals]({figure.name})"]
    lines += ["", f"![AUC by variant]({plot.name})", ""]
    timings = metrics.get("timings")
    if timings:
        lines += ["## Wall time", "", " | ".join(f"{k}: {v:.1f}s" for k, v in timings.items()), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
