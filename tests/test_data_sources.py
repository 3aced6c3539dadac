from dataclasses import replace

import numpy as np
import polars as pl
import pytest

from mmdata import SyntheticWorldConfig, generate_world, split_events


def test_movielens_matches_the_published_counts(movielens):
    items, events = movielens
    assert items.height == 1682 and events.height == 100_000
    assert events["user_id"].n_unique() == 943
    assert items.filter(pl.col("item_id") == 1)["text"][0].startswith("Toy Story (1995)")
    # label = rating >= 4: 55,375 of the 100k ratings are 4 or 5
    assert int(events["label"].sum()) == 55_375
    assert set(events.columns) >= {"cat_age_bucket", "cat_gender", "cat_occupation"}
    assert events["cat_occupation"].n_unique() == 21


def test_synthetic_world_is_seeded_and_sized(small_world):
    cfg = small_world.config
    assert small_world.events.height == cfg.n_events
    assert small_world.embeddings.vectors.shape == (cfg.n_items, cfg.dim)
    np.testing.assert_allclose(np.linalg.norm(small_world.embeddings.vectors, axis=1), 1, rtol=1e-5)
    again = generate_world(cfg, progress=False)
    assert again.events.equals(small_world.events)
    assert np.array_equal(again.embeddings.vectors, small_world.embeddings.vectors)


def test_synthetic_embeddings_show_the_cluster_hierarchy(small_world):
    x = small_world.embeddings.vectors
    cluster = small_world.items["cluster"].to_numpy()
    sub = small_world.items["subcluster"].to_numpy()
    sim = x[:300] @ x.T
    same_sub = sub[:300, None] == sub[None, :]
    same_cluster_other_sub = (cluster[:300, None] == cluster[None, :]) & ~same_sub
    other = cluster[:300, None] != cluster[None, :]
    assert sim[same_sub].mean() > sim[same_cluster_other_sub].mean() > sim[other].mean()


def test_synthetic_clicks_depend_on_taste_item_effect_and_position(small_world):
    events = small_world.events.with_columns(
        pl.Series("effect", small_world.item_effect[small_world.events["item_id"].to_numpy()]))
    top = events.filter(pl.col("effect") > 0.5)["label"].mean()
    bottom = events.filter(pl.col("effect") < -0.5)["label"].mean()
    assert top > bottom + 0.05
    by_pos = events.group_by("cat_position").agg(pl.col("label").mean()).sort("cat_position")
    assert by_pos["label"][0] > by_pos["label"][-1]


def test_synthetic_events_carry_their_true_click_logit():
    """The oracle: its AUC bounds what a model can reach, and a world of strong taste x
    content with weak item effects puts most of the clicks' signal in taste x content."""
    from mmdata import ORACLE_COLUMN, SyntheticWorldConfig, generate_world
    from ranker import auc

    def world(**kw):
        return generate_world(SyntheticWorldConfig(n_items=500, n_users=200, n_events=20_000,
                                                   dim=16, n_clusters=4, seed=3, **kw),
                              progress=False)
    base = world()
    logit = base.events[ORACLE_COLUMN].to_numpy()
    assert 0.6 < auc(base.events["label"].to_numpy(), logit) < 0.95
    # The same world bit for bit as before the column (the draws are unchanged).
    assert base.events.drop(ORACLE_COLUMN).equals(world().events.drop(ORACLE_COLUMN))
    taste = world(taste_scale=4.0, item_effect_std=0.1)
    share = {}
    for name, w in (("base", base), ("taste", taste)):
        e = w.events
        effect = w.item_effect[e["item_id"].to_numpy()]
        share[name] = np.var(effect) / np.var(e[ORACLE_COLUMN].to_numpy())
    assert share["taste"] < share["base"] / 5  # item effects explain far less of the logit


def test_synthetic_content_shows_part_of_an_items_appeal(small_world):
    """The appeal is a linear read of the latent content (so an embedding can reveal it),
    it moves clicks, and setting it to 0 leaves the rest of the world unchanged."""
    appeal, latent = small_world.content_appeal, small_world.latent
    fit = np.linalg.lstsq(np.c_[latent, np.ones(len(latent))], appeal, rcond=None)[0]
    assert np.allclose(np.c_[latent, np.ones(len(latent))] @ fit, appeal, atol=1e-4)
    assert appeal.std() == pytest.approx(small_world.config.content_appeal_std, rel=1e-3)
    events = small_world.events.with_columns(
        pl.Series("appeal", appeal[small_world.events["item_id"].to_numpy()]))
    assert (events.filter(pl.col("appeal") > 0.4)["label"].mean()
            > events.filter(pl.col("appeal") < -0.4)["label"].mean() + 0.05)
    plain = generate_world(replace(small_world.config, content_appeal_std=0.0), progress=False)
    assert np.array_equal(plain.item_effect, small_world.item_effect)
    assert np.array_equal(plain.events["item_id"].to_numpy(), small_world.events["item_id"].to_numpy())


def test_synthetic_sub_topics_have_their_own_appeal(small_world):
    """Sub-topic appeal is one number per sub-topic (a category's click rate), it moves
    clicks, and leaving it at 0 leaves the world as it was."""
    world = generate_world(replace(small_world.config, topic_appeal_std=0.8), progress=False)
    by_sub = world.items.with_columns(pl.Series("t", world.topic_appeal)) \
        .group_by("subcluster").agg(pl.col("t").std().alias("spread"), pl.col("t").first())
    assert by_sub["spread"].fill_null(0.0).max() == 0.0
    assert by_sub["t"].std() == pytest.approx(0.8, rel=0.35)
    events = world.events.with_columns(
        pl.Series("t", world.topic_appeal[world.events["item_id"].to_numpy()]))
    assert (events.filter(pl.col("t") > 0.5)["label"].mean()
            > events.filter(pl.col("t") < -0.5)["label"].mean() + 0.1)
    assert not small_world.topic_appeal.any()
    assert np.array_equal(world.events["item_id"].to_numpy(), small_world.events["item_id"].to_numpy())
    assert np.array_equal(world.content_appeal, small_world.content_appeal)


def test_synthetic_items_launch_over_time(small_world):
    first_seen = small_world.events.group_by("item_id").agg(pl.col("ts").min())
    launch = small_world.items.join(first_seen, on="item_id")
    assert (launch["ts"] >= launch["launch_ts"]).all()
    assert (small_world.items["launch_ts"] > small_world.config.time_span // 2).sum() > 100


def test_synthetic_world_scales_in_chunks():
    cfg = SyntheticWorldConfig(n_items=50_000, n_users=10_000, n_events=1_200_000, seed=1)
    world = generate_world(cfg, progress=False)
    assert world.events.height == 1_200_000
    assert world.events["ts"].is_sorted()
    assert world.events.estimated_size("mb") < 60


def test_split_protocol(small_world):
    events = small_world.events
    split = split_events(events, seed=3)
    n = events.height
    assert split.test.height == n // 10
    assert split.train["ts"].max() <= split.valid["ts"].min()
    assert split.valid["ts"].max() <= split.test["ts"].min()
    holdout = set(split.holdout_items.tolist())
    assert len(holdout) == round(events["item_id"].n_unique() * 0.1)
    assert not holdout & set(split.train["item_id"].to_list())
    assert not holdout & set(split.valid["item_id"].to_list())
    test_holdout = split.test.filter(pl.col("item_id").is_in(list(holdout)))
    assert test_holdout.height > 0 and test_holdout["is_cold"].all()
    warm = set(split.train["item_id"].to_list())
    assert (split.test["is_cold"].to_numpy()
            == ~np.isin(split.test["item_id"].to_numpy(), list(warm))).all()
    # same seed, same split; another seed, other held-out items
    assert np.array_equal(split_events(events, seed=3).holdout_items, split.holdout_items)
    assert not np.array_equal(split_events(events, seed=4).holdout_items, split.holdout_items)


def test_split_on_movielens_has_a_real_cold_slice(movielens):
    split = split_events(movielens[1], seed=0)
    assert split.test.height == 10_000
    assert 0.05 < split.test["is_cold"].mean() < 0.3
