"""The gRPC ranking server: ``mmtok.v1.RankingService`` with health checking and
reflection, hot model reload and graceful shutdown.

    mmtok serve --model runs/demo/model --port 50051 [--watch 5]

* **Model source**: a servable-model directory (``ranker/bundle.py``) or an MLflow
  artifact URI (``runs:/<run id>/model``, ``models:/<name>/<version>``), downloaded,
  loaded and checked before anything is served.
* **Hot reload**: on ``SIGHUP``, or every ``--watch`` seconds when ``bundle.json`` names
  a new ``model_version``, the new model is loaded, checksummed and warmed up beside
  the old one, then swapped in with one reference assignment. A request is checked and
  scored by one version, which ``ScoreResponse.model_version`` names; a model that
  fails to load or to warm up is logged and never served.
* **Shutdown**: ``SIGTERM``/``SIGINT`` set health to NOT_SERVING, refuse new calls and
  let in-flight ones finish (up to ``--grace`` seconds), then exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import polars as pl
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mmtok.mlflow_model import bundle_directory
from mmtok.serving.batcher import DeadlineExceeded, MicroBatcher, QueueFull, score_jobs
from mmtok.serving.requests import (InvalidRequest, RequestLimits, validate_score_request,
                                    validate_tokenize_request)
from proto.mmtok.v1 import (ItemCodes, RankingServiceServicer, ScoreResponse, TokenizeResponse,
                            add_RankingServiceServicer_to_server, ranking_pb2)
from ranker.bundle import NEW_ITEM, ServableModel

log = logging.getLogger("mmtok.serve")

SERVICE_NAME = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name


@dataclass
class ServerConfig:
    # Loopback by default: the service has no TLS and no authentication of its own.
    host: str = "127.0.0.1"
    # 0 picks a free port (``RankingServer.start`` returns it).
    port: int = 50051
    # Most candidates per Score request (and items per Tokenize request).
    max_candidates: int = 1000
    # Largest request message accepted; larger ones get RESOURCE_EXHAUSTED from gRPC.
    max_message_bytes: int = 4 * 1024 * 1024
    # gRPC handler threads.
    workers: int = 8
    # Calls in flight (running or waiting for a thread); more get RESOURCE_EXHAUSTED.
    max_pending: int = 64
    # Score concurrent requests together in one forward pass (see batcher.py).
    micro_batch: bool = True
    # Most candidate rows in one micro-batch.
    max_batch_rows: int = 2048
    # Threads running micro-batches.
    scoring_threads: int = 1
    # Seconds between checks of the model directory for a new version (0: off).
    watch_s: float = 0.0
    # Seconds in-flight calls get to finish on shutdown.
    grace_s: float = 10.0


@contextlib.contextmanager
def _download_mlflow_model(uri: str) -> Iterator[Path]:
    """The model at an MLflow artifact URI, downloaded into a temporary folder that is
    removed, whole, on leaving the ``with`` block (load the model inside it)."""
    # A server log is no place for a progress bar (the environment can still turn it on).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    tmp = tempfile.mkdtemp(prefix="mmtok-")
    try:
        yield Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_mlflow_uri(source: str) -> bool:
    return ":/" in source and not Path(source).exists()


def warm_up(model: ServableModel) -> None:
    """Scores a known and a brand-new item once, so lazy initialisation happens before
    the model takes traffic; refuses a model whose scores are not finite."""
    f = model.features
    ids = f.content.item_ids
    known = int(ids[0]) if len(ids) else 0
    unknown = int(ids.max()) + 1 if len(ids) and ids.max() < np.iinfo(np.int64).max \
        else int(ids.min()) - 1 if len(ids) else 1
    columns = {"user_id": [0, 0], "item_id": [known, unknown]}
    columns.update({name: [0, 0] for name in f.cat_names})
    columns.update({name: [0.0, 0.0] for name in f.dense_names})
    events = pl.DataFrame(columns, schema_overrides={n: pl.Float32 for n in f.dense_names})
    content_row = model.content_rows(events["item_id"].to_numpy())
    m = int((content_row == NEW_ITEM).sum()) if model.needs_content else 0
    new = np.zeros((m, model.embedding_dim or 0), dtype=np.float32)
    probs = model.score_candidates(events, content_row, new)
    if not np.isfinite(probs).all():
        raise ValueError(f"model {model.model_version}: warm-up scores are not finite ({probs})")


class ModelSlot:
    """The model being served; ``current`` is replaced whole, never mutated.

    Args:
        source: a servable-model directory or an MLflow artifact URI.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self._reload_lock = threading.Lock()
        self.reloads = 0
        self.failed_reloads = 0
        self._last_failure = ""
        self._closed = False
        self.current: ServableModel = self._load()

    def close(self) -> None:
        """Waits for a reload in progress to end and refuses later ones (a load still
        running in a thread at interpreter exit would abort the process)."""
        with self._reload_lock:
            self._closed = True

    def _load(self) -> ServableModel:
        if is_mlflow_uri(self.source):
            with _download_mlflow_model(self.source) as directory:
                # An mmtok-logged MLflow model holds the bundle under its data path.
                model = ServableModel.load(bundle_directory(directory))  # all in memory now
        else:
            # Resolve a symlink once, so a flip during the load cannot mix two versions.
            model = ServableModel.load(bundle_directory(Path(self.source).resolve()))
        warm_up(model)
        return model

    def reload(self) -> bool:
        """Loads the source's model and swaps it in if it is a new version. Returns
        whether it swapped; on any failure the old model keeps serving."""
        with self._reload_lock:
            if self._closed:
                return False
            old = self.current
            try:
                if not is_mlflow_uri(self.source):
                    manifest = ServableModel.read_manifest(bundle_directory(self.source))
                    if manifest["model_version"] == old.model_version:
                        return False
                model = self._load()
            except Exception as exc:
                self.failed_reloads += 1
                failure = f"{type(exc).__name__}: {exc}"
                if failure != self._last_failure:  # a watcher retries; say it once
                    log.error("reload from %s failed, still serving %s: %s", self.source,
                              old.model_version, failure,
                              exc_info=not isinstance(exc, (ValueError, OSError)))
                self._last_failure = failure
                return False
            self._last_failure = ""
            if model.model_version == old.model_version:
                return False
            self.current = model  # one reference assignment: requests see old or new
            self.reloads += 1
            log.info("model %s replaced by %s", old.model_version, model.model_version)
            return True


class RankingServicer(RankingServiceServicer):
    def __init__(self, slot: ModelSlot, limits: RequestLimits,
                 batcher: MicroBatcher | None) -> None:
        self.slot = slot
        self.limits = limits
        self.batcher = batcher

    def Score(self, request, context):
        model = self.slot.current  # this version checks and scores the whole request
        try:
            job = validate_score_request(request, model, self.limits)
        except InvalidRequest as exc:
            context.abort(exc.code, exc.message)
        except Exception as exc:  # a check that itself failed: answer, log, keep serving
            log.exception("checking a Score request failed")
            context.abort(grpc.StatusCode.INTERNAL, f"checking the request failed: "
                                                    f"{type(exc).__name__}")
        remaining = context.time_remaining()
        if remaining is not None:
            job.deadline = time.monotonic() + remaining
        try:
            if self.batcher is None:
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded("deadline passed before scoring")
                probs = score_jobs([job])[0]
            else:
                future = self.batcher.submit(job)
                context.add_callback(lambda: setattr(job, "cancelled", True))
                try:
                    probs = future.result(timeout=remaining)
                except TimeoutError:
                    job.cancelled = True
                    raise DeadlineExceeded("deadline passed while scoring")
        except DeadlineExceeded as exc:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        except QueueFull as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"server busy ({exc}); retry with backoff")
        except Exception as exc:
            log.exception("Score failed")
            context.abort(grpc.StatusCode.INTERNAL, f"scoring failed: {type(exc).__name__}")
        return ScoreResponse(scores=probs.tolist(), model_version=model.model_version,
                             tokenized=job.tokenized.tolist())

    def Tokenize(self, request, context):
        model = self.slot.current
        try:
            item_ids, embeddings = validate_tokenize_request(request, model, self.limits)
        except InvalidRequest as exc:
            context.abort(exc.code, exc.message)
        try:
            codes = model.tokenize(embeddings)  # (n, C)
        except Exception as exc:
            log.exception("Tokenize failed")
            context.abort(grpc.StatusCode.INTERNAL, f"tokenizing failed: {type(exc).__name__}")
        return TokenizeResponse(
            code_names=list(model.quantizer.code_names), model_version=model.model_version,
            items=[ItemCodes(item_id=int(i), codes=row) for i, row in zip(item_ids, codes.tolist())])


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RankingServer:
    """The service, its health and reflection services, the model slot and (optionally)
    the micro-batcher and the model-directory watcher, started and stopped together.

    Example::

        server = RankingServer("runs/demo/model", ServerConfig(port=0))
        port = server.start()
        ...
        server.stop()
    """

    def __init__(self, source: str, config: ServerConfig | None = None) -> None:
        self.config = config = config or ServerConfig()
        if config.watch_s and is_mlflow_uri(source):
            raise ValueError("--watch needs a local model directory; reload an MLflow model "
                             "with SIGHUP")
        self.slot = ModelSlot(source)
        self.batcher = MicroBatcher(max_rows=config.max_batch_rows, max_queue=config.max_pending,
                                    threads=config.scoring_threads) if config.micro_batch else None
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="mmtok-grpc"),
            maximum_concurrent_rpcs=config.max_pending,
            options=[("grpc.max_receive_message_length", config.max_message_bytes),
                     ("grpc.max_send_message_length", config.max_message_bytes),
                     ("grpc.so_reuseport", 0)])
        self.servicer = RankingServicer(self.slot, RequestLimits(config.max_candidates),
                                        self.batcher)
        add_RankingServiceServicer_to_server(self.servicer, self._server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server)
        self._stop_watch = threading.Event()
        self._watcher: threading.Thread | None = None
        self.port: int | None = None

    def start(self) -> int:
        """Binds and starts; returns the port."""
        address = _address(self.config.host, self.config.port)
        try:
            self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from exc
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        self._server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.watch_s:
            self._watcher = threading.Thread(target=self._watch, name="mmtok-watch", daemon=True)
            self._watcher.start()
        log.info("serving model %s on %s", self.slot.current.model_version,
                 _address(self.config.host, self.port))
        return self.port

    def _watch(self) -> None:
        while not self._stop_watch.wait(self.config.watch_s):
            self.slot.reload()

    def reload_in_background(self) -> None:
        threading.Thread(target=self.slot.reload, name="mmtok-reload", daemon=True).start()

    def stop(self, grace_s: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new calls, finish in-flight ones, stop threads."""
        grace_s = self.config.grace_s if grace_s is None else grace_s
        self.health.enter_graceful_shutdown()
        self._stop_watch.set()
        self._server.stop(grace_s).wait()
        self.slot.close()
        if self._watcher is not None:
            self._watcher.join()
        if self.batcher is None:
            log.info("stopped")
            return
        self.batcher.close()
        log.info("stopped; %d forward passes for %d micro-batched requests", self.batcher.batches,
                 self.batcher.jobs)


def serve(source: str, config: ServerConfig, *, torch_threads: int = 1) -> int:
    """Runs until SIGTERM/SIGINT; SIGHUP reloads the model. Returns the exit status."""
    import torch

    # One intra-op thread per forward pass: on a small shared machine, OpenMP threads
    # that spin against each other and the gRPC threads multiply tail latency.
    torch.set_num_threads(torch_threads)
    # force: importing fbgemm_gpu already called logging.info, which set up the root logger.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        force=True)
    server = RankingServer(source, config)
    port = server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: server.reload_in_background())
    print(f"mmtok serve: model {server.slot.current.model_version} on "
          f"{_address(config.host, port)} (pid {os.getpid()})", flush=True)
    while not stop.wait(1.0):
        pass
    log.info("shutting down: finishing in-flight calls (up to %.0fs)", config.grace_s)
    server.stop()
    return 0
