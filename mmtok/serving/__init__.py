"""Online serving: the gRPC ranking server (``mmtok serve``) and its client (``mmtok score``)."""

from mmtok.serving.batcher import MicroBatcher, score_jobs
from mmtok.serving.requests import (InvalidRequest, RequestLimits, ScoreJob,
                                    validate_score_request, validate_tokenize_request)
from mmtok.serving.server import ModelSlot, RankingServer, ServerConfig, serve

__all__ = [
    "MicroBatcher", "score_jobs", "InvalidRequest", "RequestLimits", "ScoreJob",
    "validate_score_request", "validate_tokenize_request", "ModelSlot", "RankingServer",
    "ServerConfig", "serve",
]
