"""The boundary: wire requests -> checked, model-ready jobs, or an error naming the field.

Everything a client can get wrong is caught here, before any model code runs, so the
scoring path does no validation (and a bad request cannot reach, let alone break, the
model). Each embedding is checked once and each item looked up once, here; the job
carries the results. A job is checked against one model version and scored by that
same version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import grpc
import numpy as np
import polars as pl

from proto.mmtok.v1 import ScoreRequest, TokenizeRequest
from ranker.bundle import NEW_ITEM, ServableModel


class InvalidRequest(Exception):
    """A request the server refuses; ``code`` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class RequestLimits:
    # Most candidates (Score) or items (Tokenize) in one request.
    max_candidates: int = 1000


@dataclass
class ScoreJob:
    """One checked Score request: the arguments of ``ServableModel.score_candidates``.

    Args:
        model: the model version it was checked against, and will be scored with.
        events: (n rows) user_id, item_id and the model's context columns, one row per
            candidate in request order.
        content_row: (n,) int64 each candidate's row in the model's content table,
            ``NEW_ITEM`` for an item the model does not know.
        new_embeddings: (m, d) float32 embeddings of the ``NEW_ITEM`` candidates, in
            candidate order, checked (width, finite); m is 0 when the model reads no
            content.
        deadline: ``time.monotonic()`` after which nobody waits for the answer, or None.
    """

    model: ServableModel
    events: pl.DataFrame
    content_row: np.ndarray
    new_embeddings: np.ndarray
    deadline: float | None = None
    cancelled: bool = field(default=False, repr=False)

    def __len__(self) -> int:
        return self.events.height

    @property
    def tokenized(self) -> np.ndarray:
        """(n,) bool: the candidate's content comes from its embedding, not the table."""
        if not self.model.needs_content:
            return np.zeros(len(self), dtype=bool)
        return self.content_row == NEW_ITEM


def _invalid(message: str) -> InvalidRequest:
    return InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, message)


def _check_count(n: int, what: str, limits: RequestLimits) -> None:
    if n == 0:
        raise _invalid(f"{what}: empty; send at least one")
    if n > limits.max_candidates:
        raise _invalid(f"{what}: {n} entries, this server takes at most "
                       f"{limits.max_candidates} per request")


def _check_keys(given, expected: list[str], what: str) -> None:
    missing = [k for k in expected if k not in given]
    unknown = sorted(k for k in given if k not in expected)
    if missing or unknown:
        problem = f"missing {missing}" if missing else f"unknown keys {unknown}"
        raise _invalid(f"{what}: {problem}; the model reads exactly {expected}")


def _embedding_matrix(items, rows: np.ndarray, dim: int, what: str) -> np.ndarray:
    """(len(rows), dim) float32 of ``items[r].embedding``; rows must all be that wide."""
    matrix = np.array([items[int(r)].embedding for r in rows], dtype=np.float32)
    matrix = matrix.reshape(len(rows), dim)
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        bad = int(rows[np.flatnonzero(~finite)[0]])
        raise _invalid(f"{what}[{bad}].embedding: NaN or Inf values")
    return matrix


def _check_widths(widths: np.ndarray, dim: int | None, what: str) -> None:
    if dim is None:
        return
    wrong = np.flatnonzero((widths != 0) & (widths != dim))
    if len(wrong):
        i = int(wrong[0])
        raise _invalid(f"{what}[{i}].embedding: width {int(widths[i])}, the model's embeddings "
                       f"are {dim} wide ({len(wrong)} of the {what} have a wrong width)")


def validate_score_request(request: ScoreRequest, model: ServableModel,
                           limits: RequestLimits) -> ScoreJob:
    """Checks a Score request against ``model``; raises ``InvalidRequest`` naming the field.

    Every embedding sent must be the model's width and finite; an item the model does
    not know must carry one (when the model reads content at all).
    """
    candidates = request.candidates
    n = len(candidates)
    _check_count(n, "candidates", limits)
    features = model.features
    _check_keys(request.context, features.cat_names, "context")
    _check_keys(request.dense, features.dense_names, "dense")
    for name in features.dense_names:
        if not math.isfinite(request.dense[name]):
            raise _invalid(f"dense['{name}']: NaN or Inf")

    item_ids = np.fromiter((c.item_id for c in candidates), dtype=np.int64, count=n)
    widths = np.fromiter((len(c.embedding) for c in candidates), dtype=np.int64, count=n)
    dim = model.embedding_dim if model.needs_content else None
    _check_widths(widths, dim, "candidates")
    # Check once at the boundary: one lookup per item, one check per embedding sent;
    # the scoring path trusts the job's rows and embeddings.
    content_row = model.content_rows(item_ids)  # (n,)
    new_embeddings = np.zeros((0, dim or 0), dtype=np.float32)
    if dim is not None:
        new = content_row == NEW_ITEM
        lacking = np.flatnonzero(new & (widths == 0))
        if len(lacking):
            i = int(lacking[0])
            raise _invalid(f"candidates[{i}].embedding: missing; item_id {int(item_ids[i])} is "
                           f"unknown to model {model.model_version}, so it needs its embedding "
                           f"({len(lacking)} such candidates)")
        # Embeddings of known items are checked (a NaN is a client bug) but not used.
        sent = np.flatnonzero(widths)
        matrix = _embedding_matrix(candidates, sent, dim, "candidates")  # (len(sent), d)
        new_embeddings = matrix[new[sent]]  # (m, d), candidate order

    columns = {"user_id": np.full(n, request.user_id, dtype=np.int64), "item_id": item_ids}
    for name in features.cat_names:
        columns[name] = np.full(n, request.context[name], dtype=np.int64)
    for name in features.dense_names:
        columns[name] = np.full(n, request.dense[name], dtype=np.float32)
    return ScoreJob(model=model, events=pl.DataFrame(columns), content_row=content_row,
                    new_embeddings=new_embeddings)


def validate_tokenize_request(request: TokenizeRequest, model: ServableModel,
                              limits: RequestLimits) -> tuple[np.ndarray, np.ndarray]:
    """Checks a Tokenize request; returns ``(item_ids (n,), embeddings (n, d) float32)``."""
    if model.quantizer is None:
        raise InvalidRequest(grpc.StatusCode.FAILED_PRECONDITION,
                             f"model {model.model_version} has no quantizer: it reads no "
                             "content IDs")
    items = request.items
    n = len(items)
    _check_count(n, "items", limits)
    dim = model.embedding_dim
    widths = np.fromiter((len(c.embedding) for c in items), dtype=np.int64, count=n)
    missing = np.flatnonzero(widths == 0)
    if len(missing):
        raise _invalid(f"items[{int(missing[0])}].embedding: missing; Tokenize needs every "
                       "item's embedding")
    _check_widths(widths, dim, "items")
    item_ids = np.fromiter((c.item_id for c in items), dtype=np.int64, count=n)
    return item_ids, _embedding_matrix(items, np.arange(n), dim, "items")
