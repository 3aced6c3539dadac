"""The ``mmtok`` command line.

    mmtok demo --out runs/demo                      # MovieLens-100K end to end
    mmtok data movielens --out data/ml100k          # items.parquet + events.parquet
    mmtok data synthetic --out data/synth --items 100000 --events 1000000
    mmtok data docstrings --out data/docstrings --n 50000
    mmtok featurize --items items.parquet --out item_embeddings.parquet
    mmtok quantize --embeddings item_embeddings.parquet --out runs/rq
    mmtok bench-quantizer --embeddings item_embeddings.parquet --out runs/bench-q
    mmtok train --config job.toml [--resume]        # also under torchrun --nproc_per_node=N
    mmtok bench-ranking --events events.parquet --item-embeddings item_embeddings.parquet --out runs/bench
    mmtok serve --model runs/demo/model --port 50051 [--watch 5]
    mmtok score --addr 127.0.0.1:50051 --request request.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmtok.quiet import quiet_library_warnings


# quantizer.TASK_SIGNALS, named here so that `mmtok --help` imports no torch (a test
# keeps the two the same).
TASK_SIGNAL_CHOICES = ["clicks", "co_engagement"]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def cmd_demo(args: argparse.Namespace) -> None:
    from mmtok.demo import run_demo

    run_demo(args.out, seed=args.seed, seeds=args.seeds, epochs=args.epochs,
             quantizer=args.quantizer, quantizer_steps=args.quantizer_steps,
             task_signal=args.task_signal, progress=not args.quiet)


def cmd_data_movielens(args: argparse.Namespace) -> None:
    from mmdata import write_movielens_100k

    items, events = write_movielens_100k(args.out)
    print(f"wrote {items} and {events}")


def cmd_data_synthetic(args: argparse.Namespace) -> None:
    from mmdata import SyntheticWorldConfig, generate_world

    appeal = {name: value for name, value in (("content_appeal_std", args.content_appeal),
                                              ("topic_appeal_std", args.topic_appeal),
                                              ("taste_scale", args.taste_scale),
                                              ("item_effect_std", args.item_effect),
                                              ("style_weight", args.style))
              if value is not None}
    config = SyntheticWorldConfig(n_items=args.items, n_users=args.users, n_events=args.events,
                                  dim=args.dim, seed=args.seed, **appeal)
    paths = generate_world(config, progress=not args.quiet).write(args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def cmd_data_docstrings(args: argparse.Namespace) -> None:
    from mmdata.docstrings import load_docstring_corpus

    args.out.mkdir(parents=True, exist_ok=True)
    items = load_docstring_corpus(args.n, seed=args.seed, progress=not args.quiet)
    items.write_parquet(args.out / "items.parquet")
    print(f"wrote {args.out / 'items.parquet'}: {items.height} docstrings")


def cmd_featurize(args: argparse.Namespace) -> None:
    from featurizer import (EfficientNetLite0Encoder, HFTextEncoder, HFVisionEncoder,
                            embed_items, minilm_text_encoder)
    from mmdata import read_items, write_embeddings

    items = read_items(args.items)
    encoders = []
    if args.text_encoder != "none" and "text" in items.columns:
        encoders.append(minilm_text_encoder(device=args.device) if args.text_encoder == "minilm"
                        else HFTextEncoder(args.text_encoder, device=args.device))
    if args.image_encoder != "none" and "image_path" in items.columns:
        encoders.append(EfficientNetLite0Encoder(device=args.device)
                        if args.image_encoder == "efficientnet"
                        else HFVisionEncoder(args.image_encoder, device=args.device))
    if not encoders:
        raise ValueError(f"{args.items}: no encoder applies (columns: {items.columns}, "
                         f"--text-encoder {args.text_encoder}, --image-encoder {args.image_encoder})")
    embeddings = embed_items(items, encoders, batch_size=args.batch_size, progress=not args.quiet)
    write_embeddings(embeddings, args.out)
    print(f"wrote {args.out}: {len(embeddings)} items x {embeddings.dim} "
          f"({' + '.join(e.name for e in encoders)})")


def cmd_quantize(args: argparse.Namespace) -> None:
    from mmdata import read_embeddings
    from quantizer import build_quantizer, encode_items, quantizer_metrics, save_quantizer
    from quantizer.task_aware import DEFAULT_TASK_SIGNAL

    embeddings = read_embeddings(args.embeddings)
    if args.task_signal and not args.events:
        raise SystemExit("mmtok quantize: --task-signal needs --events (the training period's)")
    quantizer = build_quantizer(args.quantizer, seed=args.seed, steps=args.steps,
                                scale_sizes=args.scale_sizes, levels=args.levels,
                                scale_mode=args.scale_mode,
                                task_signal=(args.task_signal or DEFAULT_TASK_SIGNAL)
                                if args.events else None)
    if args.events:  # task-aware tokens: the encoder aligns with these events first
        from mmdata.contracts import scan_events
        from quantizer import Engagement

        events = scan_events(args.events).select("user_id", "item_id", "label").collect()
        engagement = Engagement.from_events(events, embeddings.item_ids)
        quantizer.fit(embeddings.vectors, progress=not args.quiet, engagement=engagement)
    else:
        quantizer.fit(embeddings.vectors, progress=not args.quiet)
    out = Path(args.out)
    save_quantizer(quantizer, out / "quantizer")
    codes = encode_items(quantizer, embeddings)
    codes.write_parquet(out / "item_codes.parquet")
    matrix = codes.select(quantizer.code_names).to_numpy()
    metrics = quantizer_metrics(embeddings.vectors, matrix, quantizer.decode(matrix),
                                quantizer.codebook_sizes, seed=args.seed)
    print(f"wrote {out / 'item_codes.parquet'} and {out / 'quantizer'}")
    print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def cmd_bench_quantizer(args: argparse.Namespace) -> None:
    from mmtok.bench_quantizer import run_bench_quantizer

    run_bench_quantizer(args.embeddings, args.out, scale_sizes=args.scale_sizes,
                        levels=args.levels, holdout=args.holdout, seed=args.seed,
                        steps=args.steps, only=args.only, stability=args.stability,
                        scale_mode=args.scale_mode, progress=not args.quiet)
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'report.md'}")


def cmd_train(args: argparse.Namespace) -> None:
    from mmtok.train_cmd import run_train_command

    metrics = run_train_command(args.config, resume=args.resume, progress=not args.quiet,
                                out=args.out, variant=args.variant, track=not args.no_track,
                                register=args.register, max_steps=args.max_steps)
    if "stopped_after_steps" in metrics and _is_rank0():
        print(f"stopped after {metrics['stopped_after_steps']} steps, "
              f"{metrics['train_examples_per_s']:,.0f} ex/s (not tested)")
    if "auc" in metrics and _is_rank0():
        print(f"test AUC {metrics['auc']:.4f} (warm {metrics['auc_warm']:.4f}, "
              f"cold {metrics['auc_cold']:.4f}), best epoch {metrics['best_epoch']} "
              f"(valid AUC {metrics['valid_auc']:.4f}), {metrics['train_examples_per_s']:,.0f} ex/s")
        print(f"servable model {metrics['model_version']} -> {metrics['model_dir']}")
        if "mlflow_run_id" in metrics:
            model = f"models:/{args.register}/{metrics['registered_version']}" if args.register \
                else f"runs:/{metrics['mlflow_run_id']}/model"
            print(f"MLflow run {metrics['mlflow_run_id']}; serve it with: "
                  f"MLFLOW_TRACKING_URI={metrics['mlflow_tracking_uri']} mmtok serve --model {model}")


def cmd_split(args: argparse.Namespace) -> None:
    from mmdata import write_split

    split = write_split(args.events, args.out, valid_frac=args.valid_frac,
                        test_frac=args.test_frac, holdout_frac=args.holdout_frac, seed=args.seed)
    s = split.summary
    print(f"wrote {args.out}: train {s['train']['rows']:,} / valid {s['valid']['rows']:,} / "
          f"test {s['test']['rows']:,} rows; {s['holdout_items']:,} items held out, "
          f"{s['test']['cold_rows']:,} cold test rows")


def _is_rank0() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def cmd_bench_ranking(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from mmtok.bench_ranking import run_bench_ranking
    from ranker import RankerConfig
    from ranker.job import load_ranker_config

    config = load_ranker_config(args.config) if args.config else RankerConfig()
    config = replace(config, seed=args.seed, **({"epochs": args.epochs} if args.epochs else {}))
    run_bench_ranking(args.events, args.item_embeddings, args.out, config=config,
                      variants=args.variants, baselines=args.baselines,
                      scale_sizes=args.scale_sizes, levels=args.levels,
                      quantizer=args.quantizer, quantizer_steps=args.quantizer_steps,
                      task_signal=args.task_signal, scale_mode=args.scale_mode,
                      nproc=args.nproc, workers=args.jobs, seed=args.seed,
                      ranker_seeds=args.seeds, streaming=not args.in_memory,
                      progress=not args.quiet)


def cmd_serve(args: argparse.Namespace) -> int:
    from mmtok.serving import ServerConfig, serve

    return serve(args.model, ServerConfig(
        host=args.host, port=args.port, max_candidates=args.max_candidates,
        max_message_bytes=args.max_message_bytes, workers=args.workers,
        max_pending=args.max_pending, micro_batch=args.micro_batch == "on",
        scoring_threads=args.scoring_threads,
        watch_s=args.watch, grace_s=args.grace), torch_threads=args.torch_threads)


def cmd_score(args: argparse.Namespace) -> None:
    from mmtok.serving.client import run_score_command

    run_score_command(args.addr, args.request, timeout=args.timeout, as_json=args.json,
                      tokenize_only=args.tokenize, health_only=args.health)


def _scale_mode(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale-mode", choices=["cascade", "parallel"], default=None,
                   help="mmdict's scales: parallel (default: each scale quantizes the whole "
                        "item, the scales kept apart by an orthogonality penalty; better IDs "
                        "for the ranker) or cascade (S, then M on what S left, then L; better "
                        "reconstruction at equal bits)")



def _seed_and_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmtok", description="Ad content as discrete IDs for TorchRec CTR ranking.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="MovieLens-100K end to end: embed, quantize, rank, report")
    p.add_argument("--out", required=True, type=Path, help="run directory (created)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="max ranker epochs (default: config)")
    p.add_argument("--seeds", type=int, default=3,
                   help="ranker seeds per variant (from --seed); the report's intervals cover them")
    p.add_argument("--quantizer", default="mmdict",
                   choices=["mmdict", "rq-kmeans", "conditional_rq"],
                   help="content-ID quantizer: mmdict (default, the learned one), conditional_rq "
                        "(QINCo-style conditional codebooks: better codes, slow encode) or "
                        "rq-kmeans (three parallel k-means scales)")
    p.add_argument("--quantizer-steps", type=int, default=None,
                   help="mmdict training steps (default: config)")
    p.add_argument("--task-signal", choices=TASK_SIGNAL_CHOICES, default=None,
                   help="what the task-aware tokens of `task_ids` align with, from the training "
                        "events only: clicks (a small click model, default) or co_engagement "
                        "(items clicked by the same users pulled together)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="write a dataset in the mmtok contracts")
    data_sub = data.add_subparsers(dest="dataset", required=True)
    p = data_sub.add_parser("movielens", help="MovieLens-100K from the recbole wheel")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_data_movielens)
    p = data_sub.add_parser("synthetic", help="the synthetic ads world (known answer, any size)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--users", type=int, default=5_000)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=64, help="content embedding width")
    p.add_argument("--content-appeal", type=float,
                   help="std of the appeal that is a linear read of an item's content "
                        "(default: SyntheticWorldConfig's)")
    p.add_argument("--taste-scale", type=float,
                   help="strength of user taste x content in the click logit (default: "
                        "SyntheticWorldConfig's; raise it, with a small --item-effect, for a "
                        "world whose clicks depend mostly on taste x content)")
    p.add_argument("--item-effect", type=float,
                   help="std of the per-item effect only an item id can learn")
    p.add_argument("--topic-appeal", type=float,
                   help="std of the appeal each sub-topic has, a category's click rate "
                        "(default: SyntheticWorldConfig's)")
    p.add_argument("--style", type=float,
                   help="weight of the click-irrelevant style in the content embedding "
                        "(default: SyntheticWorldConfig's; raise it for content whose loudest "
                        "variation is not what users click on)")
    _seed_and_quiet(p)
    p.set_defaults(func=cmd_data_synthetic)

    p = data_sub.add_parser("docstrings",
                            help="a real text corpus built offline from installed Python docstrings")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n", type=int, default=50_000)
    _seed_and_quiet(p)
    p.set_defaults(func=cmd_data_docstrings)

    p = sub.add_parser("featurize", help="items.parquet -> item_embeddings.parquet")
    p.add_argument("--items", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--text-encoder", default="minilm",
                   help="'minilm' (packaged), a local Hugging Face model directory, or 'none'")
    p.add_argument("--image-encoder", default="efficientnet",
                   help="'efficientnet' (packaged), a local Hugging Face vision/CLIP directory, "
                        "or 'none'")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_featurize)

    p = sub.add_parser("quantize", help="item embeddings -> item codes (+ the fitted quantizer)")
    p.add_argument("--embeddings", required=True, type=Path, help="parquet or .npy")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--scale-sizes", type=_int_list, default=[16, 64, 256],
                   help="codebook size per scale, coarse to fine (default 16,64,256)")
    p.add_argument("--levels", type=int, default=2, help="residual levels per scale")
    p.add_argument("--quantizer", default="mmdict",
                   choices=["mmdict", "rq-kmeans", "conditional_rq"],
                   help="mmdict (learned, default), conditional_rq (QINCo-style conditional "
                        "codebooks) or rq-kmeans (parallel k-means scales)")
    p.add_argument("--steps", type=int, default=None,
                   help="most training steps (mmdict, conditional_rq)")
    _scale_mode(p)
    p.add_argument("--events", type=Path, default=None,
                   help="task-aware tokens (mmdict): the training period's events (contract; "
                        "e.g. `mmtok split`'s train.parquet) the encoder aligns with before the "
                        "codes are cut; items without events here get their codes from content")
    p.add_argument("--task-signal", choices=TASK_SIGNAL_CHOICES, default=None,
                   help="with --events: clicks (default) or co_engagement")
    _seed_and_quiet(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("bench-quantizer",
                       help="mmtok vs faiss RQ/PQ, k-means and LSH at equal bits on one file")
    p.add_argument("--embeddings", required=True, type=Path, help="parquet or .npy (float16/32)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--scale-sizes", type=_int_list, default=[16, 64, 256])
    p.add_argument("--levels", type=int, default=2)
    p.add_argument("--holdout", type=float, default=0.2,
                   help="share of rows held out for measuring (at most 10,000)")
    p.add_argument("--steps", type=int, default=None, help="mmtok training steps")
    _scale_mode(p)
    p.add_argument("--only", type=lambda s: s.split(","), default=None,
                   help="comma-separated subset of mmtok,faiss_rq,faiss_pq,kmeans,lsh")
    p.add_argument("--no-stability", dest="stability", action="store_false",
                   help="skip the second fit (seed + 1) that measures how many items' IDs "
                        "change with the seed")
    _seed_and_quiet(p)
    p.set_defaults(func=cmd_bench_quantizer)

    p = sub.add_parser("split", help="events -> the evaluation protocol's train / valid / test "
                                     "parquet files (time split + held-out cold items)")
    p.add_argument("--events", required=True, type=Path, help="events parquet (contract)")
    p.add_argument("--out", required=True, type=Path, help="directory for the three files")
    p.add_argument("--valid-frac", type=float, default=0.1, help="share of events, by time")
    p.add_argument("--test-frac", type=float, default=0.1, help="the last share of events")
    p.add_argument("--holdout-frac", type=float, default=0.1,
                   help="share of items whose pre-test events are dropped (they arrive cold)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("train", help="train one ranker variant from a TOML job file "
                       "(also as one rank under torchrun --nproc_per_node=N); writes "
                       "OUT/model, a servable model")
    p.add_argument("--config", required=True, type=Path, help="job TOML (see ranker/job.py)")
    p.add_argument("--out", type=Path, default=None, help="override the job's out directory")
    p.add_argument("--variant", default=None,
                   help="override the job's variant (no_content, dense, recon, ids, ids_dense)")
    p.add_argument("--register", default=None, metavar="NAME",
                   help="register the trained model in MLflow as a new version of NAME "
                        "(then serve models:/NAME/<version> or an alias you set)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in OUT/checkpoints")
    p.add_argument("--no-track", action="store_true", help="no MLflow run")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps without testing (smoke and memory runs)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench-ranking",
                       help="quantization-loss report: every variant on events + item embeddings")
    p.add_argument("--events", required=True, type=Path, help="events parquet (contract)")
    p.add_argument("--item-embeddings", required=True, type=Path, help="parquet or .npy")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--config", type=Path, default=None,
                   help="TOML whose [ranker] table sets the architecture and budget")
    p.add_argument("--variants", type=lambda s: s.split(","), default=None,
                   help="comma-separated subset (default: all, baselines included)")
    p.add_argument("--baselines", type=lambda s: [b for b in s.split(",") if b],
                   default=None, help="baseline quantizers for <name>_ids (default: all four)")
    p.add_argument("--quantizer", default="mmdict",
                   choices=["mmdict", "rq-kmeans", "conditional_rq"],
                   help="the quantizer whose IDs the core variants use (default mmdict)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--scale-sizes", type=_int_list, default=[16, 64, 256],
                   help="codebook size of each scale (S, M, L, ...), the same for the baselines' bits")
    p.add_argument("--levels", type=int, default=2,
                   help="residual levels per scale (IDs per item = scales x levels)")
    p.add_argument("--quantizer-steps", type=int, default=None, help="mmtok training steps")
    _scale_mode(p)
    p.add_argument("--task-signal", choices=TASK_SIGNAL_CHOICES, default=None,
                   help="what the task-aware tokens of `task_ids` align with, from the training "
                        "events only: clicks (a small click model, default) or co_engagement "
                        "(items clicked by the same users pulled together)")
    p.add_argument("--nproc", type=int, default=1, help="torchrun processes per variant")
    p.add_argument("--jobs", type=int, default=None,
                   help="training runs side by side, each in a process of its own (default: "
                        "the cores, over each run's --nproc x the ranker's num_threads; "
                        "1: one by one in this process)")
    p.add_argument("--in-memory", action="store_true", help="load training events in memory")
    p.add_argument("--seeds", type=_int_list, default=[0, 1, 2],
                   help="train each variant once per ranker seed and report means, with "
                        "intervals over the test rows and the seeds (default 0,1,2)")
    _seed_and_quiet(p)
    p.set_defaults(func=cmd_bench_ranking)

    p = sub.add_parser("serve", help="gRPC ranking server (mmtok.v1.RankingService, health, "
                                     "reflection); SIGHUP reloads, SIGTERM drains")
    p.add_argument("--model", required=True,
                   help="servable-model directory (e.g. runs/demo/model) or MLflow artifact URI")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default loopback: the service has no TLS or auth)")
    p.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                   help="reload when the model directory holds a new version (0: off)")
    p.add_argument("--micro-batch", choices=["on", "off"], default="on",
                   help="score concurrent requests in one forward pass")
    p.add_argument("--scoring-threads", type=int, default=1,
                   help="threads running micro-batches (with --micro-batch on)")
    p.add_argument("--max-candidates", type=int, default=1000)
    p.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--workers", type=int, default=8, help="gRPC handler threads")
    p.add_argument("--max-pending", type=int, default=64,
                   help="calls in flight before RESOURCE_EXHAUSTED")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds in-flight calls get to finish on SIGTERM")
    p.add_argument("--torch-threads", type=int, default=1)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("score", help="send a Score (or Tokenize) request from a JSON file")
    p.add_argument("--addr", default="127.0.0.1:50051")
    p.add_argument("--request", type=Path, help="ScoreRequest as protobuf JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds")
    p.add_argument("--tokenize", action="store_true",
                   help="content IDs of the candidates that carry an embedding, not scores")
    p.add_argument("--health", action="store_true",
                   help="only check health (exit 0 when SERVING)")
    p.add_argument("--json", action="store_true", help="print the response as JSON")
    p.set_defaults(func=cmd_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_warnings()
    from mmdata.contracts import DataContractError
    from ranker.checkpoint import CheckpointError

    try:
        return args.func(args) or 0
    except (DataContractError, CheckpointError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"mmtok {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
