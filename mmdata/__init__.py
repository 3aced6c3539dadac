"""mmtok's data layer: the file contracts, the packaged real data, the synthetic world
and the evaluation split. Every other package reads data through here."""

from mmdata.contracts import (
    DataContractError,
    ItemEmbeddings,
    code_columns,
    context_columns,
    read_codes,
    read_embeddings,
    read_events,
    read_items,
    scan_events,
    validate_codes,
    validate_embedding_matrix,
    validate_events,
    validate_items,
    write_embeddings,
)
from mmdata.movielens import load_movielens_100k, write_movielens_100k
from mmdata.split import EventSplit, SplitFiles, split_events, write_split
from mmdata.synthetic import ORACLE_COLUMN, SyntheticWorld, SyntheticWorldConfig, generate_world

__all__ = [
    "DataContractError", "ItemEmbeddings", "code_columns", "context_columns", "read_codes",
    "scan_events",
    "read_embeddings", "read_events", "read_items", "validate_codes",
    "validate_embedding_matrix", "validate_events", "validate_items", "write_embeddings",
    "load_movielens_100k", "write_movielens_100k", "EventSplit", "SplitFiles", "split_events", "write_split",
    "ORACLE_COLUMN", "SyntheticWorld", "SyntheticWorldConfig", "generate_world",
]
