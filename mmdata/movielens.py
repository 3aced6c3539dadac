"""MovieLens-100K, read from the copy that ships inside the ``recbole`` wheel.

No download: ``pip install --no-deps recbole==1.2.1`` puts the files under
``recbole/dataset_example/ml-100k/``. The movie is the "ad": its text is
``"<title> (<year>). Genres: <genres>"``; an event is a rating, labelled 1 when the
rating is 4 or 5 (a "click"); the user's age bucket, gender and occupation are
categorical context.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import polars as pl

from mmdata.contracts import DataContractError, validate_events, validate_items

# MovieLens' own age groups (the 1M release's buckets).
AGE_BUCKET_EDGES = [18, 25, 35, 45, 50, 56]


def movielens_dir() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataContractError(
            "MovieLens-100K ships inside the recbole wheel, which is not installed: "
            "pip install --no-deps recbole==1.2.1 (or run `make install`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"
    if not (path / "ml-100k.inter").exists():
        raise DataContractError(f"{path}: MovieLens-100K files missing from the recbole wheel")
    return path


def _read_atomic(path: Path) -> pl.DataFrame:
    df = pl.read_csv(path, separator="\t", quote_char=None, infer_schema=False)
    # recbole headers read "user_id:token"; keep the name before the colon.
    return df.rename({c: c.split(":")[0] for c in df.columns})


def load_movielens_100k() -> tuple[pl.DataFrame, pl.DataFrame]:
    """Returns ``(items, events)`` frames that follow the data contracts.

    Returns:
        items: 1,682 rows: item_id, text, title, year, genres.
        events: 100,000 rows: user_id, item_id, ts, label, rating,
            cat_age_bucket, cat_gender, cat_occupation.
    """
    root = movielens_dir()
    items = _read_atomic(root / "ml-100k.item").select(
        pl.col("item_id").cast(pl.Int64),
        pl.col("movie_title").alias("title"),
        pl.col("release_year").cast(pl.Int64, strict=False).alias("year"),
        pl.col("class").alias("genres"),
    )
    year = pl.when(pl.col("year").is_not_null()).then(
        pl.lit(" (") + pl.col("year").cast(pl.String) + pl.lit(")")
    ).otherwise(pl.lit(""))
    items = items.with_columns(
        (
            pl.col("title")
            + year
            + pl.lit(". Genres: ")
            + pl.col("genres").fill_null("unknown").str.replace_all(" ", ", ")
        ).alias("text")
    ).select("item_id", "text", "title", "year", "genres")

    users = _read_atomic(root / "ml-100k.user")
    occupations = sorted(users["occupation"].unique().to_list())
    users = users.select(
        pl.col("user_id").cast(pl.Int64),
        pl.col("age").cast(pl.Int64).cut(AGE_BUCKET_EDGES, left_closed=True)
        .to_physical().cast(pl.Int64).alias("cat_age_bucket"),
        (pl.col("gender") == "F").cast(pl.Int64).alias("cat_gender"),
        pl.col("occupation").replace_strict(occupations, list(range(len(occupations))))
        .cast(pl.Int64).alias("cat_occupation"),
    )

    ratings = _read_atomic(root / "ml-100k.inter").select(
        pl.col("user_id").cast(pl.Int64),
        pl.col("item_id").cast(pl.Int64),
        pl.col("timestamp").cast(pl.Float64).cast(pl.Int64).alias("ts"),
        pl.col("rating").cast(pl.Float64).cast(pl.Int64).alias("rating"),
    )
    events = (
        ratings.join(users, on="user_id", how="left")
        .with_columns((pl.col("rating") >= 4).cast(pl.Int8).alias("label"))
        .select("user_id", "item_id", "ts", "label", "rating",
                "cat_age_bucket", "cat_gender", "cat_occupation")
        .sort("ts", "user_id", "item_id")
    )
    return validate_items(items), validate_events(events)


def write_movielens_100k(out_dir: str | Path) -> tuple[Path, Path]:
    """Writes ``items.parquet`` and ``events.parquet`` under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items, events = load_movielens_100k()
    items.write_parquet(out_dir / "items.parquet")
    events.write_parquet(out_dir / "events.parquet")
    return out_dir / "items.parquet", out_dir / "events.parquet"
