"""A synthetic ads world with a known answer, for scale tests and for tests of behaviour.

What the generator puts in, so that each part of mmtok has something to find:

* **Hierarchical item clusters**: ``n_clusters`` topics, each with
  ``subclusters_per_cluster`` sub-topics; an item's latent content ``z`` sits near its
  sub-topic centre. Coarse IDs should find topics, fine IDs sub-topics.
* **A content embedding an encoder would show**: ``x = normalize(tanh(z W) + s V)``,
  a non-linear view of ``z`` mixed with a "style" latent ``s`` that has nothing to do
  with clicks (an encoder sees more than what drives CTR).
* **Clicks that depend on content x user taste**: ``logit = taste_scale * <u, z>``,
  each user's taste ``u`` drawn near one or two topic centres.
* **Appeal the content shows**: ``a_i = content_appeal_std * <d, z_i>`` (standardized)
  for one fixed direction ``d`` in latent space, the same for every user: a creative's
  quality is partly visible in its pixels and words, so content predicts clicks on an
  item no one has clicked yet.
* **Appeal by sub-topic**: ``t_k ~ N(0, topic_appeal_std)`` for each sub-topic ``k``,
  the same for every user and not a smooth function of ``z``: a category's click rate
  (games draw more clicks than insurance) is a fact a model memorizes, not one it reads
  off a direction in embedding space. An item's sub-topic shows in its content, so
  content predicts ``t`` for a new item; a discrete ID for the sub-topic can learn it
  as one number.
* **Per-item effects only an ID can learn**: ``b_i ~ N(0, item_effect_std)``, not
  visible in the embedding.
* **Position bias**: ``cat_position`` in 0..n_positions-1 lowers the logit by
  ``position_bias * log1p(position)``.
* **Items launching over time**: launch times spread over the time line, so later
  items have short histories and some arrive only in the test period.
* **The answer**: every event carries ``oracle_logit``, its true click logit, so a report
  can give the oracle AUC (the best any model can do on these events) and the share of
  the gap from a baseline to it that each model closes. A large ``taste_scale`` with
  small item effects makes a world whose clicks depend mostly on user taste x content.

Generation is chunked over events with numpy, so 10M events over 1M items fit well
inside 24 GB (about 0.5 GB for the events frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from mmdata.contracts import ItemEmbeddings, write_embeddings

# The events column holding each event's true click logit (a synthetic world knows it).
ORACLE_COLUMN = "oracle_logit"


@dataclass
class SyntheticWorldConfig:
    n_items: int = 20_000
    n_users: int = 5_000
    n_events: int = 200_000
    # Width of the content embedding the "encoder" shows.
    dim: int = 64
    # Width of the latent content that drives clicks.
    latent_dim: int = 16
    n_clusters: int = 20
    subclusters_per_cluster: int = 8
    # Strength of user taste x content in the click logit.
    taste_scale: float = 1.5
    # Std of the per-item effect that only an item ID can learn.
    item_effect_std: float = 0.6
    # Std of the per-item appeal that the content shows (0: content matters only
    # through user taste). Drawn from its own stream: 0 gives the world of before.
    content_appeal_std: float = 0.5
    # Std of the per-sub-topic appeal (0: none). Drawn from its own stream: 0 gives the
    # world of before bit for bit.
    topic_appeal_std: float = 0.0
    position_bias: float = 0.35
    n_positions: int = 10
    # Logit offset; sets the base click rate (about 0.2 at -1.6).
    base_logit: float = -1.6
    # Share of the embedding's variance that is click-irrelevant "style".
    style_weight: float = 0.35
    # Time line length in seconds (events' ts run over [0, time_span)).
    time_span: int = 90 * 86_400
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_items", "n_users", "n_events", "dim", "latent_dim", "n_clusters",
                     "subclusters_per_cluster", "n_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"SyntheticWorldConfig.{name} must be >= 1")


@dataclass
class SyntheticWorld:
    config: SyntheticWorldConfig
    items: pl.DataFrame
    embeddings: ItemEmbeddings
    events: pl.DataFrame
    # Ground truth for tests: latent content (n_items, latent_dim) and item effects.
    latent: np.ndarray
    item_effect: np.ndarray
    # (n_items,) the appeal the content shows (see content_appeal_std).
    content_appeal: np.ndarray
    # (n_items,) the appeal of the item's sub-topic (see topic_appeal_std).
    topic_appeal: np.ndarray

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {
            "items": out_dir / "items.parquet",
            "item_embeddings": out_dir / "item_embeddings.parquet",
            "events": out_dir / "events.parquet",
        }
        self.items.write_parquet(paths["items"])
        write_embeddings(self.embeddings, paths["item_embeddings"])
        self.events.write_parquet(paths["events"])
        return paths


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def generate_world(
    config: SyntheticWorldConfig | None = None, *, progress: bool = True
) -> SyntheticWorld:
    """Draws a world from ``config``. Same config, same world (bit for bit)."""
    cfg = config or SyntheticWorldConfig()
    rng = np.random.default_rng(cfg.seed)
    f32 = np.float32

    # --- items: topic -> sub-topic -> item, in latent space
    topic_centers = rng.normal(size=(cfg.n_clusters, cfg.latent_dim)).astype(f32)
    n_sub = cfg.n_clusters * cfg.subclusters_per_cluster
    sub_topic = np.repeat(np.arange(cfg.n_clusters), cfg.subclusters_per_cluster)
    sub_centers = topic_centers[sub_topic] + 0.6 * rng.normal(
        size=(n_sub, cfg.latent_dim)).astype(f32)
    item_sub = rng.integers(0, n_sub, size=cfg.n_items)
    latent = sub_centers[item_sub] + 0.3 * rng.normal(
        size=(cfg.n_items, cfg.latent_dim)).astype(f32)  # (I, L)
    latent /= np.sqrt(cfg.latent_dim)

    # --- what an encoder shows: a non-linear view of z plus click-irrelevant style
    w_content = rng.normal(size=(cfg.latent_dim, cfg.dim)).astype(f32)
    style_dim = max(4, cfg.latent_dim // 2)
    w_style = rng.normal(size=(style_dim, cfg.dim)).astype(f32) / np.sqrt(style_dim)
    vectors = np.empty((cfg.n_items, cfg.dim), dtype=f32)
    for start in range(0, cfg.n_items, 200_000):
        stop = min(start + 200_000, cfg.n_items)
        style = rng.normal(size=(stop - start, style_dim)).astype(f32)
        view = np.tanh(latent[start:stop] @ w_content) + cfg.style_weight * (style @ w_style)
        vectors[start:stop] = _normalize(view)

    item_effect = (cfg.item_effect_std * rng.normal(size=cfg.n_items)).astype(f32)
    appeal_dir = np.random.default_rng([cfg.seed, 1]).normal(size=cfg.latent_dim).astype(f32)
    appeal = latent @ appeal_dir
    appeal = (cfg.content_appeal_std * (appeal - appeal.mean()) / max(appeal.std(), 1e-12)
              ).astype(f32)
    sub_appeal = (cfg.topic_appeal_std
                  * np.random.default_rng([cfg.seed, 2]).normal(size=n_sub)).astype(f32)
    topic_appeal = sub_appeal[item_sub]
    popularity = rng.lognormal(mean=0.0, sigma=1.0, size=cfg.n_items).astype(f32)
    # Most items exist from the start; the rest launch over the time line (new ads).
    launch = np.where(
        rng.random(cfg.n_items) < 0.6, 0.0, rng.random(cfg.n_items) * 0.95 * cfg.time_span
    ).astype(np.int64)
    by_launch = np.argsort(launch, kind="stable")
    launch_sorted = launch[by_launch]

    # --- users: taste near one or two topics
    user_topic_a = rng.integers(0, cfg.n_clusters, size=cfg.n_users)
    user_topic_b = rng.integers(0, cfg.n_clusters, size=cfg.n_users)
    mix = rng.random(cfg.n_users)[:, None].astype(f32)
    taste = (mix * topic_centers[user_topic_a] + (1 - mix) * topic_centers[user_topic_b]
             + 0.5 * rng.normal(size=(cfg.n_users, cfg.latent_dim)).astype(f32))
    taste /= np.sqrt(cfg.latent_dim)
    user_activity = rng.lognormal(mean=0.0, sigma=0.8, size=cfg.n_users)
    user_cdf = np.cumsum(user_activity) / user_activity.sum()
    pop_max = float(popularity.max())

    # --- events, chunked
    ts = np.sort(rng.integers(0, cfg.time_span, size=cfg.n_events))
    columns = {k: np.empty(cfg.n_events, dtype=np.int64)
               for k in ("user_id", "item_id", "cat_position", "cat_device")}
    labels = np.empty(cfg.n_events, dtype=np.int8)
    oracle = np.empty(cfg.n_events, dtype=f32)
    chunk = 1_000_000
    bar = tqdm(total=cfg.n_events, desc="synthetic events", unit="ev", disable=not progress)
    for start in range(0, cfg.n_events, chunk):
        stop = min(start + chunk, cfg.n_events)
        n = stop - start
        t = ts[start:stop]
        launched = np.maximum(np.searchsorted(launch_sorted, t, side="right"), 1)
        # Popularity-weighted choice among launched items, by rejection sampling.
        item = np.empty(n, dtype=np.int64)
        todo = np.arange(n)
        while len(todo):
            cand = by_launch[(rng.random(len(todo)) * launched[todo]).astype(np.int64)]
            accept = rng.random(len(todo)) * pop_max < popularity[cand]
            item[todo[accept]] = cand[accept]
            todo = todo[~accept]
        user = np.minimum(np.searchsorted(user_cdf, rng.random(n)), cfg.n_users - 1)
        position = rng.integers(0, cfg.n_positions, size=n)
        device = rng.integers(0, 3, size=n)
        logit = (cfg.base_logit
                 + cfg.taste_scale * np.einsum("nl,nl->n", taste[user], latent[item])
                 + item_effect[item] + appeal[item] + topic_appeal[item]
                 - cfg.position_bias * np.log1p(position)
                 + 0.1 * (device == 2))
        labels[start:stop] = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
        oracle[start:stop] = logit
        columns["user_id"][start:stop] = user
        columns["item_id"][start:stop] = item
        columns["cat_position"][start:stop] = position
        columns["cat_device"][start:stop] = device
        bar.update(n)
    bar.close()

    events = pl.DataFrame({
        "user_id": columns["user_id"],
        "item_id": columns["item_id"],
        "ts": ts.astype(np.int64),
        "label": labels,
        "cat_position": columns["cat_position"],
        "cat_device": columns["cat_device"],
        ORACLE_COLUMN: oracle,
    })
    item_ids = np.arange(cfg.n_items, dtype=np.int64)
    items = pl.DataFrame({
        "item_id": item_ids,
        "cluster": (item_sub // cfg.subclusters_per_cluster).astype(np.int64),
        "subcluster": item_sub.astype(np.int64),
        "launch_ts": launch,
    }).with_columns(
        pl.format("synthetic ad {} (topic {}, sub-topic {})",
                  "item_id", "cluster", "subcluster").alias("text")
    )
    return SyntheticWorld(
        config=cfg,
        items=items,
        embeddings=ItemEmbeddings(item_ids, vectors),
        events=events,
        latent=latent,
        item_effect=item_effect,
        content_appeal=appeal,
        topic_appeal=topic_appeal,
    )
