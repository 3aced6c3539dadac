"""``mmtok.v1``: the ranking service's messages and gRPC stubs, generated from
``ranking.proto`` by ``make proto`` (do not edit the ``*_pb2*.py`` files)."""

from proto.mmtok.v1 import ranking_pb2, ranking_pb2_grpc
from proto.mmtok.v1.ranking_pb2 import (Candidate, ItemCodes, ScoreRequest, ScoreResponse,
                                        TokenizeRequest, TokenizeResponse)
from proto.mmtok.v1.ranking_pb2_grpc import (RankingServiceServicer, RankingServiceStub,
                                             add_RankingServiceServicer_to_server)

__all__ = [
    "ranking_pb2", "ranking_pb2_grpc", "Candidate", "ItemCodes", "ScoreRequest",
    "ScoreResponse", "TokenizeRequest", "TokenizeResponse", "RankingServiceServicer",
    "RankingServiceStub", "add_RankingServiceServicer_to_server",
]
