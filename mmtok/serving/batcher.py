"""Scoring of checked jobs: one forward pass per group of requests, and the optional
micro-batcher that forms such groups from concurrent requests.

    handler threads          bounded queue            scoring thread(s)
    job A (200 rows) ──┐
    job B (200 rows) ──┼──▶ [A B C ...] ──▶ take A, then B, C while same model
    job C (200 rows) ──┘                     and rows <= max_rows ──▶ one forward
                                             ──▶ each handler gets its slice

There is no timer: a job that arrives at an idle server is scored alone at once;
jobs only share a forward pass when they queued up behind a running one, which is
when batching pays (fewer, larger forward passes under load).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future

import numpy as np
import polars as pl

from mmtok.serving.requests import ScoreJob

log = logging.getLogger("mmtok.serve")


class DeadlineExceeded(Exception):
    """The job's deadline passed (or its caller went away) before it was scored."""


class QueueFull(Exception):
    """The micro-batcher's queue holds ``max_queue`` jobs already."""


def score_jobs(jobs: list[ScoreJob]) -> list[np.ndarray]:
    """Scores jobs checked against one model in a single forward pass.

    Returns one (n_i,) float32 array of probabilities per job, in job order.
    """
    model = jobs[0].model
    if len(jobs) == 1:
        job = jobs[0]
        return [model.score_candidates(job.events, job.content_row, job.new_embeddings)]
    events = pl.concat([job.events for job in jobs], how="vertical")  # (sum n_i rows)
    content_row = np.concatenate([job.content_row for job in jobs])  # (sum n_i,)
    new = np.concatenate([job.new_embeddings for job in jobs])  # (sum m_i, d)
    probs = model.score_candidates(events, content_row, new)
    return np.split(probs, np.cumsum([len(job) for job in jobs])[:-1])


class MicroBatcher:
    """Scores queued jobs on one thread, grouping those waiting into one forward pass.

    Args:
        max_rows: most candidate rows per forward pass (a job larger than this is
            still scored, alone).
        max_queue: most jobs waiting; ``submit`` raises ``QueueFull`` beyond it.
        threads: scoring threads taking groups from the one queue (two let a second
            forward pass run while the first holds no GIL, e.g. on two cores).

    Example::

        batcher = MicroBatcher(max_rows=2048, max_queue=64)
        probs = batcher.submit(job).result(timeout=0.5)   # (n,) float32
        batcher.close()
    """

    def __init__(self, *, max_rows: int = 2048, max_queue: int = 64, threads: int = 1) -> None:
        self.max_rows = max_rows
        self.max_queue = max_queue
        self._queue: collections.deque[tuple[ScoreJob, Future]] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        # Forward passes run and jobs scored, for the load benchmark's batching figures.
        self.batches = 0
        self.jobs = 0
        self._threads = [threading.Thread(target=self._run, name=f"mmtok-batcher-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, job: ScoreJob) -> Future:
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the micro-batcher is closed")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests already queued")
            self._queue.append((job, future))
            self._cond.notify()
        return future

    def close(self) -> None:
        """Scores what is queued, then stops the threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    def _take_group(self) -> list[tuple[ScoreJob, Future]] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None  # closed and drained
            group = [self._queue.popleft()]
            rows = len(group[0][0])
            model = group[0][0].model
            while self._queue:
                job, _ = self._queue[0]
                if job.model is not model or rows + len(job) > self.max_rows:
                    break
                group.append(self._queue.popleft())
                rows += len(job)
            return group

    def _run(self) -> None:
        while (group := self._take_group()) is not None:
            now = time.monotonic()
            live = []
            for job, future in group:
                if job.cancelled or (job.deadline is not None and now >= job.deadline):
                    future.set_exception(DeadlineExceeded("deadline passed while queued"))
                elif future.set_running_or_notify_cancel():
                    live.append((job, future))
            if not live:
                continue
            try:
                results = score_jobs([job for job, _ in live])
            except Exception as exc:  # never let one bad batch stop the scoring thread
                log.exception("scoring a batch of %d requests failed", len(live))
                for _, future in live:
                    future.set_exception(exc)
                continue
            with self._cond:
                self.batches += 1
                self.jobs += len(live)
            for (_, future), probs in zip(live, results):
                future.set_result(probs)
