"""A small client: requests from JSON files, scores and codes printed as tables.

    mmtok score --addr 127.0.0.1:50051 --request request.json
    mmtok score --addr 127.0.0.1:50051 --request request.json --tokenize   # embeddings -> IDs
    mmtok score --addr 127.0.0.1:50051 --health

The JSON file is a ``ScoreRequest`` in the protobuf JSON mapping::

    {"user_id": 7, "context": {"cat_gender": 1}, "dense": {},
     "candidates": [{"item_id": 50}, {"item_id": 900001, "embedding": [0.01, ...]}]}
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.mmtok.v1 import RankingServiceStub, ScoreRequest, ScoreResponse, TokenizeRequest


class ServerError(ValueError):
    """The server answered with an error status; the message carries code and details."""


def read_score_request(path: str | Path) -> ScoreRequest:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: request file does not exist")
    try:
        return json_format.Parse(path.read_text(), ScoreRequest())
    except json_format.ParseError as exc:
        raise ValueError(f"{path}: not a ScoreRequest in protobuf JSON: {exc}") from exc


def _call(method, request, timeout: float):
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as exc:
        raise ServerError(f"{exc.code().name}: {exc.details()}") from exc


def score(address: str, request: ScoreRequest, *, timeout: float = 5.0) -> ScoreResponse:
    with grpc.insecure_channel(address) as channel:
        return _call(RankingServiceStub(channel).Score, request, timeout)


def tokenize(address: str, request: ScoreRequest, *, timeout: float = 5.0):
    """Content IDs of the request's candidates that carry an embedding."""
    items = [c for c in request.candidates if len(c.embedding)]
    if not items:
        raise ValueError("no candidate carries an embedding: nothing to tokenize")
    with grpc.insecure_channel(address) as channel:
        return _call(RankingServiceStub(channel).Tokenize, TokenizeRequest(items=items), timeout)


def health_status(address: str, *, service: str = "", timeout: float = 5.0) -> str:
    """``SERVING``, ``NOT_SERVING``, ... as the standard health service reports it."""
    with grpc.insecure_channel(address) as channel:
        reply = _call(health_pb2_grpc.HealthStub(channel).Check,
                      health_pb2.HealthCheckRequest(service=service), timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def run_score_command(address: str, request_path: Path | None, *, timeout: float,
                      as_json: bool, tokenize_only: bool, health_only: bool) -> None:
    """``mmtok score``: prints a table (or the response as JSON); raises on any error."""
    if health_only:
        status = health_status(address, timeout=timeout)
        print(status)
        if status != "SERVING":
            raise ServerError(f"{address} is {status}")
        return
    if request_path is None:
        raise ValueError("--request is required (unless --health)")
    request = read_score_request(request_path)
    if tokenize_only:
        reply = tokenize(address, request, timeout=timeout)
        if as_json:  # by hand: protobuf's JSON mapping writes int64 as strings
            print(json.dumps({"model_version": reply.model_version,
                              "code_names": list(reply.code_names),
                              "items": [{"item_id": item.item_id, "codes": list(item.codes)}
                                        for item in reply.items]}, indent=2))
            return
        print(f"model_version {reply.model_version}")
        print("\t".join(["item_id", *reply.code_names]))
        for item in reply.items:
            print("\t".join(str(v) for v in [item.item_id, *item.codes]))
        return
    reply = score(address, request, timeout=timeout)
    if as_json:
        print(json.dumps({"model_version": reply.model_version,
                          "scores": [round(s, 6) for s in reply.scores],
                          "tokenized": list(reply.tokenized)}, indent=2))
        return
    print(f"model_version {reply.model_version}")
    print("item_id\tscore\tcontent_ids")
    for candidate, s, new in zip(request.candidates, reply.scores, reply.tokenized):
        print(f"{candidate.item_id}\t{s:.6f}\t{'tokenized' if new else 'table'}")
