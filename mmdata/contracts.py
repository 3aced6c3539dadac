"""The data contracts every mmtok tool reads and writes (see README, "Data contracts").

Each reader checks its file at the boundary and raises :class:`DataContractError`
naming the file and the column, so a user with their own data sees what to fix
rather than a stack trace from deep inside polars or torch. The hot paths that
come after trust what these readers return.

| file            | columns                                                            |
|-----------------|--------------------------------------------------------------------|
| items           | item_id int64; optional text str; optional image_path str          |
| item embeddings | item_id int64; embedding fixed-size list/array of float32          |
| item codes      | item_id int64; code_<scale>_<level> int64, one column per code      |
| events          | user_id int64; item_id int64; ts int64; label 0/1;                 |
|                 | optional cat_* int64; optional dense_* float                       |

A bare ``.npy`` matrix (float16/float32, N x D) is accepted wherever embeddings are
read; its rows get item ids 0..N-1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

CODE_COLUMN = re.compile(r"^code_[a-z0-9]+_[0-9]+$")


class DataContractError(ValueError):
    """A file does not follow its data contract. The message names file and column."""


def _where(path: str | Path | None) -> str:
    return f"{path}" if path is not None else "<in-memory frame>"


def _require_integer(df: pl.DataFrame, column: str, path, *, kind: str) -> None:
    if column not in df.columns:
        raise DataContractError(
            f"{_where(path)}: {kind} file has no column '{column}' (columns: {df.columns})"
        )
    dtype = df.schema[column]
    if not dtype.is_integer():
        raise DataContractError(
            f"{_where(path)}: column '{column}' must be an integer type (int64), got {dtype}"
        )
    nulls = df[column].null_count()
    if nulls:
        raise DataContractError(f"{_where(path)}: column '{column}' has {nulls} null values")


def _read_parquet(path: str | Path, kind: str) -> pl.DataFrame:
    path = Path(path)
    if not path.exists():
        raise DataContractError(f"{path}: {kind} file does not exist")
    try:
        return pl.read_parquet(path)
    except Exception as exc:  # polars raises several types for a non-parquet file
        raise DataContractError(f"{path}: cannot read {kind} file as parquet: {exc}") from exc


# ----------------------------------------------------------------------------- items


def validate_items(df: pl.DataFrame, path: str | Path | None = None) -> pl.DataFrame:
    """Checks an items frame; returns it with ``item_id`` cast to int64."""
    _require_integer(df, "item_id", path, kind="items")
    for column in ("text", "image_path"):
        if column in df.columns and df.schema[column] not in (pl.String, pl.Null):
            raise DataContractError(
                f"{_where(path)}: column '{column}' must be a string, got {df.schema[column]}"
            )
    if "text" not in df.columns and "image_path" not in df.columns:
        raise DataContractError(
            f"{_where(path)}: items file has neither a 'text' nor an 'image_path' column: "
            "nothing to encode"
        )
    if df["item_id"].n_unique() != df.height:
        raise DataContractError(f"{_where(path)}: column 'item_id' has duplicate values")
    return df.with_columns(pl.col("item_id").cast(pl.Int64))


def read_items(path: str | Path) -> pl.DataFrame:
    return validate_items(_read_parquet(path, "items"), path)


# ------------------------------------------------------------------------ embeddings


@dataclass
class ItemEmbeddings:
    """Item ids and their content embeddings, row-aligned.

    Args:
        item_ids: (n,) int64.
        vectors: (n, d) float32.
    """

    item_ids: np.ndarray
    vectors: np.ndarray

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def __len__(self) -> int:
        return len(self.item_ids)

    def to_frame(self) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "item_id": pl.Series(self.item_ids, dtype=pl.Int64),
                "embedding": pl.Series(
                    self.vectors.astype(np.float32), dtype=pl.Array(pl.Float32, self.dim)
                ),
            }
        )


def validate_embedding_matrix(
    vectors: np.ndarray, path: str | Path | None = None, *, expected_dim: int | None = None
) -> np.ndarray:
    """Checks an (n, d) embedding matrix: float, 2-D, finite, the expected width."""
    if vectors.ndim != 2:
        raise DataContractError(
            f"{_where(path)}: embeddings must be a 2-D (n, d) matrix, got shape {vectors.shape}"
        )
    if vectors.dtype not in (np.float16, np.float32, np.float64):
        raise DataContractError(
            f"{_where(path)}: embeddings must be float16 or float32, got {vectors.dtype}"
        )
    if expected_dim is not None and vectors.shape[1] != expected_dim:
        raise DataContractError(
            f"{_where(path)}: column 'embedding' has width {vectors.shape[1]}, "
            f"expected {expected_dim}"
        )
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataContractError(
            f"{_where(path)}: column 'embedding' has {len(bad)} rows with NaN/Inf "
            f"(first at row {bad[0]})"
        )
    return vectors.astype(np.float32, copy=False)


def read_embeddings(path: str | Path, *, expected_dim: int | None = None) -> ItemEmbeddings:
    """Reads an item-embeddings parquet file or a bare ``.npy`` (n, d) matrix."""
    path = Path(path)
    if path.suffix == ".npy":
        if not path.exists():
            raise DataContractError(f"{path}: embeddings file does not exist")
        vectors = np.load(path, allow_pickle=False)
        vectors = validate_embedding_matrix(vectors, path, expected_dim=expected_dim)
        return ItemEmbeddings(np.arange(len(vectors), dtype=np.int64), vectors)

    df = _read_parquet(path, "item embeddings")
    _require_integer(df, "item_id", path, kind="item embeddings")
    if "embedding" not in df.columns:
        raise DataContractError(f"{path}: item embeddings file has no column 'embedding'")
    dtype = df.schema["embedding"]
    if isinstance(dtype, pl.List):
        widths = df["embedding"].list.len().unique().to_list()
        if len(widths) != 1:
            raise DataContractError(
                f"{path}: column 'embedding' rows have different widths {sorted(widths)[:5]}; "
                "one width per file"
            )
        inner = dtype.inner
        width = widths[0]
        flat = df["embedding"].explode()
    elif isinstance(dtype, pl.Array):
        inner, width = dtype.inner, dtype.size
        flat = df["embedding"].arr.explode()
    else:
        raise DataContractError(
            f"{path}: column 'embedding' must be a list/array of float32, got {dtype}"
        )
    if not inner.is_float():
        raise DataContractError(f"{path}: column 'embedding' must hold floats, got {inner}")
    if df["embedding"].null_count() or flat.null_count():
        raise DataContractError(f"{path}: column 'embedding' has null values")
    vectors = flat.to_numpy().reshape(df.height, width)
    vectors = validate_embedding_matrix(vectors, path, expected_dim=expected_dim)
    return ItemEmbeddings(df["item_id"].cast(pl.Int64).to_numpy(), vectors)


def write_embeddings(embeddings: ItemEmbeddings, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    embeddings.to_frame().write_parquet(path)
    return path


# ----------------------------------------------------------------------------- codes


def code_columns(df: pl.DataFrame) -> list[str]:
    return [c for c in df.columns if CODE_COLUMN.match(c)]


def validate_codes(df: pl.DataFrame, path: str | Path | None = None) -> pl.DataFrame:
    _require_integer(df, "item_id", path, kind="item codes")
    columns = code_columns(df)
    if not columns:
        raise DataContractError(
            f"{_where(path)}: item codes file has no code_<scale>_<level> column"
        )
    for column in columns:
        _require_integer(df, column, path, kind="item codes")
        if (df[column] < 0).any():
            raise DataContractError(f"{_where(path)}: column '{column}' has negative codes")
    return df.select(pl.col(["item_id", *columns]).cast(pl.Int64))


def read_codes(path: str | Path) -> pl.DataFrame:
    return validate_codes(_read_parquet(path, "item codes"), path)


# ---------------------------------------------------------------------------- events


def validate_events(df: pl.DataFrame, path: str | Path | None = None) -> pl.DataFrame:
    """Checks an events frame; returns it with the contract's dtypes (label as int8)."""
    for column in ("user_id", "item_id", "ts"):
        _require_integer(df, column, path, kind="events")
    if "label" not in df.columns:
        raise DataContractError(f"{_where(path)}: events file has no column 'label'")
    label = df["label"]
    if label.dtype.is_float() and label.is_nan().any():
        raise DataContractError(
            f"{_where(path)}: column 'label' has {label.is_nan().sum()} NaN values"
        )
    if label.null_count():
        raise DataContractError(f"{_where(path)}: column 'label' has {label.null_count()} nulls")
    if not (label.dtype.is_numeric() or label.dtype == pl.Boolean):
        raise DataContractError(f"{_where(path)}: column 'label' must be 0/1, got {label.dtype}")
    bad = df.filter(~pl.col("label").cast(pl.Float64).is_in([0.0, 1.0])).height
    if bad:
        raise DataContractError(f"{_where(path)}: column 'label' has {bad} values not in {{0, 1}}")
    casts = [pl.col(c).cast(pl.Int64) for c in ("user_id", "item_id", "ts")]
    for column in df.columns:
        if column.startswith("cat_"):
            _require_integer(df, column, path, kind="events")
            casts.append(pl.col(column).cast(pl.Int64))
        elif column.startswith("dense_"):
            if not df.schema[column].is_numeric():
                raise DataContractError(
                    f"{_where(path)}: column '{column}' must be numeric, got {df.schema[column]}"
                )
            values = df[column].cast(pl.Float64)
            if values.null_count() or values.is_nan().any() or values.is_infinite().any():
                raise DataContractError(f"{_where(path)}: column '{column}' has null/NaN/Inf")
            casts.append(pl.col(column).cast(pl.Float32))
    return df.with_columns(*casts, pl.col("label").cast(pl.Int8))


def read_events(path: str | Path) -> pl.DataFrame:
    return validate_events(_read_parquet(path, "events"), path)


def scan_events(path: str | Path, *, chunk_rows: int = 1_000_000) -> pl.LazyFrame:
    """An events file too big for memory: checked chunk by chunk with the same rules as
    ``read_events``, then returned as a lazy scan with the contract's dtypes."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise DataContractError(f"{path}: events file does not exist")
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a non-parquet file
        raise DataContractError(f"{path}: cannot read events file as parquet: {exc}") from exc
    if parquet.metadata.num_rows == 0:
        raise DataContractError(f"{path}: events file has no rows")
    for batch in parquet.iter_batches(batch_size=chunk_rows):
        checked = validate_events(pl.from_arrow(batch), path)
    casts = [pl.col(name).cast(dtype) for name, dtype in checked.schema.items()
             if name in ("user_id", "item_id", "ts", "label") or name.startswith(("cat_", "dense_"))]
    return pl.scan_parquet(path).with_columns(casts)


def context_columns(frame: pl.DataFrame | pl.Schema) -> tuple[list[str], list[str]]:
    """The optional ``cat_*`` and ``dense_*`` columns of an events frame (or its schema),
    in order."""
    names = list(frame.columns if isinstance(frame, pl.DataFrame) else frame.names())
    cats = [c for c in names if c.startswith("cat_")]
    denses = [c for c in names if c.startswith("dense_")]
    return cats, denses
