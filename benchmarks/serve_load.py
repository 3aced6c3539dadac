"""Load test of the gRPC ranking server on loopback.

    # open loop: 50 requests/s for 60 s, 200 candidates each, 20% brand-new ads
    python benchmarks/serve_load.py --model runs/demo/model --rate 50 --duration 60
    # closed loop: 8 clients, each sends its next request when the answer arrives
    python benchmarks/serve_load.py --model runs/demo/model --clients 8 --duration 30
    # a new model version every 10 s (symlink flip + SIGHUP) under traffic
    python benchmarks/serve_load.py --model runs/demo/model --rate 50 --duration 60 \
        --reload-every 10
    # any `mmtok serve` option after --
    python benchmarks/serve_load.py --model runs/demo/model --rate 100 -- --micro-batch off

Starts ``mmtok serve`` as a child process on a free loopback port and ends it with
SIGTERM. Requests draw known users, context values and items from the model's own
tables; a brand-new ad gets an unused item id and an embedding made from a known
item's reconstruction ``decode(codes)`` plus noise, renormalised (so the server's
quantizer does real work on plausible vectors). In open loop, request k is due at
``k / rate`` and its latency counts from then, so a server that falls behind is charged
for the queueing it causes (no coordinated omission).

Prints requests/s, candidates scored/s, p50/p95/p99/max latency, errors by status,
the server's RSS at start (after warm-up) and end, and the model versions that
answered; ``--json`` appends the figures to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proto.mmtok.v1 import Candidate, RankingServiceStub, ScoreRequest  # noqa: E402
from ranker.bundle import ServableModel  # noqa: E402


def build_requests(model: ServableModel, *, n: int, candidates: int, new_share: float,
                   seed: int) -> list[ScoreRequest]:
    """``n`` distinct requests shaped like the model's training traffic."""
    rng = np.random.default_rng(seed)
    f = model.features
    known_ids = f.content.item_ids
    users = f.vocabs["user_id"].ids
    next_new = int(known_ids.max()) + 1
    n_new = int(round(candidates * new_share))
    requests = []
    for _ in range(n):
        known = rng.choice(known_ids, size=candidates - n_new, replace=False)
        cands = [Candidate(item_id=int(i)) for i in known]
        if n_new:
            rows = rng.integers(0, len(known_ids), size=n_new)
            base = model.quantizer.decode(f.content.codes[rows]) if f.use_codes else \
                f.content.vectors[rows]
            emb = base + rng.normal(scale=0.05, size=base.shape).astype(np.float32)
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            for vector in emb:
                cands.append(Candidate(item_id=next_new, embedding=vector.tolist()))
                next_new += 1
        order = rng.permutation(len(cands))
        requests.append(ScoreRequest(
            user_id=int(rng.choice(users)),
            context={name: int(rng.choice(f.vocabs[name].ids)) for name in f.cat_names},
            dense={name: float(rng.normal()) for name in f.dense_names},
            candidates=[cands[i] for i in order]))
    return requests


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(model_dir: Path, extra: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "mmtok.cli", "serve", "--model", str(model_dir),
                             "--port", "0", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=log, text=True)
    line = proc.stdout.readline()
    if " on " not in line:
        proc.kill()
        raise RuntimeError(f"server did not start (see {log_path}): {line!r}")
    return proc, line.split(" on ")[1].split()[0]


def run_load(address: str, requests: list[ScoreRequest], *, clients: int, duration: float,
             rate: float | None, timeout: float, on_tick=None) -> dict:
    """Sends requests for ``duration`` seconds; returns latencies and outcome counts."""
    latencies: list[float] = []
    codes: Counter = Counter()
    versions: Counter = Counter()
    lock = threading.Lock()
    start = time.perf_counter() + 0.2
    stop_at = start + duration

    def client(index: int) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = RankingServiceStub(channel)
            k = index
            while True:
                due = start + k / rate if rate else time.perf_counter()
                if due >= stop_at:
                    return
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                elif rate and -delay > timeout:
                    # Its caller gave up already: counted as an error, not sent. This is
                    # how overload shows in open loop, and it keeps the run bounded.
                    with lock:
                        codes["LATE_NOT_SENT"] += 1
                    k += clients
                    continue
                request = requests[k % len(requests)]
                try:
                    reply = stub.Score(request, timeout=timeout)
                    outcome, version = "OK", reply.model_version
                except grpc.RpcError as exc:
                    outcome, version = exc.code().name, None
                done = time.perf_counter()
                with lock:
                    codes[outcome] += 1
                    if version:
                        versions[version] += 1
                        latencies.append(done - due)
                k += clients

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(0.25)
        if on_tick is not None:
            on_tick(time.perf_counter() - start)
        if time.perf_counter() > stop_at + 4 * timeout + 5:  # bounded even if a call hangs
            break
    return {"latencies": np.array(latencies), "codes": codes, "versions": versions,
            "elapsed": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="servable-model directory")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--rate", type=float, default=None,
                        help="requests/s, open loop (default: closed loop)")
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--new-share", type=float, default=0.2,
                        help="share of candidates that are brand-new ads with an embedding")
    parser.add_argument("--timeout", type=float, default=2.0, help="per-request deadline, s")
    parser.add_argument("--warmup", type=int, default=200, help="requests before measuring")
    parser.add_argument("--reload-every", type=float, default=0.0,
                        help="publish another model version and SIGHUP every N seconds")
    parser.add_argument("--label", default="", help="name of this run in the table")
    parser.add_argument("--json", type=Path, default=None, help="append the figures here")
    parser.add_argument("server_args", nargs="*", help="extra `mmtok serve` options, after --")
    args = parser.parse_args(argv)

    model = ServableModel.load(args.model)
    requests = build_requests(model, n=64, candidates=args.candidates,
                              new_share=args.new_share, seed=0)
    work = Path(tempfile.mkdtemp(prefix="mmtok-load-"))
    served = args.model.resolve()
    if args.reload_every:
        # Two versions (same weights, different names) behind a symlink that flips.
        model.save(work / "a", name="bench-a")
        model.save(work / "b", name="bench-b")
        served = work / "current"
        served.symlink_to(work / "a")
    proc, address = start_server(served, args.server_args, work / "server.log")
    try:
        run_load(address, requests, clients=min(args.clients, 4),
                 duration=max(1.0, args.warmup / 100), rate=None, timeout=args.timeout)
        rss_start = rss_mib(proc.pid)
        rss_samples = [rss_start]
        flips = {"n": 0, "next": args.reload_every}

        def on_tick(t: float) -> None:
            rss_samples.append(rss_mib(proc.pid))
            if args.reload_every and flips["next"] <= t < args.duration:
                flips["n"] += 1
                flips["next"] += args.reload_every
                tmp = work / "current.tmp"
                tmp.symlink_to(work / ("b" if flips["n"] % 2 else "a"))
                os.replace(tmp, served)  # atomic publication, then tell the server
                proc.send_signal(signal.SIGHUP)

        result = run_load(address, requests, clients=args.clients, duration=args.duration,
                          rate=args.rate, timeout=args.timeout, on_tick=on_tick)
        rss_end = rss_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            exit_code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            exit_code = proc.wait()
    log_lines = (work / "server.log").read_text().splitlines()
    batching = next((line.split("stopped; ")[1] for line in log_lines if "stopped; " in line), "")
    reloads = sum("replaced by" in line for line in log_lines)

    lat = result["latencies"] * 1e3
    ok = result["codes"]["OK"]
    errors = {k: v for k, v in result["codes"].items() if k != "OK"}
    qps = ok / result["elapsed"]
    figures = {
        "label": args.label, "mode": f"open {args.rate:g}/s" if args.rate else "closed",
        "clients": args.clients, "duration_s": args.duration, "candidates": args.candidates,
        "new_share": args.new_share, "server_args": " ".join(args.server_args),
        "requests_ok": ok, "qps": qps, "candidates_per_s": qps * args.candidates,
        "p50_ms": float(np.percentile(lat, 50)) if ok else None,
        "p95_ms": float(np.percentile(lat, 95)) if ok else None,
        "p99_ms": float(np.percentile(lat, 99)) if ok else None,
        "max_ms": float(lat.max()) if ok else None,
        "errors": errors, "rss_start_mib": rss_start, "rss_end_mib": rss_end,
        "rss_max_mib": max(rss_samples), "rss_growth": rss_end / rss_start - 1,
        "versions": dict(result["versions"]), "model_flips": flips["n"], "reloads": reloads,
        "server_exit": exit_code, "batching": batching,
    }
    print(f"| run | mode | clients | req/s | cand/s | p50 ms | p95 ms | p99 ms | max ms | errors "
          f"| RSS start→end MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    print(f"| {args.label or '-'} | {figures['mode']} | {args.clients} | {qps:.1f} | "
          f"{figures['candidates_per_s']:.0f} | {figures['p50_ms']:.2f} | {figures['p95_ms']:.2f} | "
          f"{figures['p99_ms']:.2f} | {figures['max_ms']:.1f} | {sum(errors.values())} "
          f"{dict(errors) if errors else ''}| {rss_start:.0f}→{rss_end:.0f} "
          f"({100 * figures['rss_growth']:+.1f}%) |")
    print(f"versions answered: {dict(result['versions'])}; model flips {flips['n']}, reloads "
          f"logged {reloads}; server: {batching or 'no batcher'}; exit {exit_code}")
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(figures) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
