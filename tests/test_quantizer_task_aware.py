"""Task-aware tokens: the encoder aligned with behaviour, cold items tokenized from content."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from mmdata import write_split
from quantizer import TASK_SIGNALS, Engagement, MmDictConfig, MmDictQuantizer
from quantizer.task_aware import (DEFAULT_TASK_SIGNAL, AlignmentConfig, align_encoder,
                                  held_out_items, id_click_losses)


def _taste_world(n_items=1500, n_users=300, n_events=30_000, seed=0):
    """Items whose clicks depend on two low-variance content axes (their class), buried
    under 14 high-variance axes no user cares about; each user group clicks one class."""
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 4, n_items)
    signal = np.stack([np.where(cls % 2, 1.0, -1.0), np.where(cls // 2, 1.0, -1.0)], 1)
    x = np.concatenate([0.35 * signal + 0.05 * rng.normal(size=(n_items, 2)),
                        rng.normal(size=(n_items, 14))], 1).astype(np.float32)
    users = rng.integers(0, n_users, n_events)
    items = rng.integers(0, n_items, n_events)
    likes = users % 4
    p = np.where(cls[items] == likes, 0.6, 0.05)
    events = pl.DataFrame({"user_id": users.astype(np.int64), "item_id": items.astype(np.int64),
                           "label": (rng.random(n_events) < p).astype(np.int8),
                           "ts": np.arange(n_events, dtype=np.int64)})
    return x, cls, events


def _purity(codes: np.ndarray, cls: np.ndarray) -> float:
    """Share of items whose code tuple's majority class is their own."""
    frame = pl.DataFrame({"code": [str(c) for c in codes.tolist()], "cls": cls})
    counts = frame.group_by("code", "cls").len()
    majority = counts.group_by("code").agg(pl.col("len").max())["len"].sum()
    return majority / len(cls)


def _config(**kw) -> MmDictConfig:
    return MmDictConfig(scale_sizes=[4, 16], levels=1, steps=20, decoder_hidden=0,
                        task_steps=300, **kw)


def test_engagement_keeps_the_fit_rows_events_and_pairs_one_users_clicks():
    events = pl.DataFrame({"user_id": [7, 7, 7, 9, 9, 5], "item_id": [10, 11, 99, 11, 12, 12],
                           "label": [1, 1, 1, 1, 1, 0]})
    eng = Engagement.from_events(events, np.array([12, 11, 10]))  # item 99 is not a fit row
    assert len(eng) == 5 and eng.n_users == 3
    assert sorted(eng.rows.tolist()) == [0, 0, 1, 1, 2]
    pairs = {tuple(sorted(p)) for p in eng.co_engaged_pairs(seed=0).tolist()}
    assert pairs == {(1, 2), (0, 1)}  # user 7: items 11+10; user 9: 11+12; user 5 no click
    with pytest.raises(ValueError, match="missing"):
        Engagement.from_events(events.drop("label"), np.array([10]))
    with pytest.raises(ValueError, match="none of the engagement events"):
        Engagement.from_events(events, np.array([1000]))


@pytest.mark.parametrize("signal", TASK_SIGNALS)
def test_alignment_spends_the_codes_on_what_users_click(signal, monkeypatch):
    import quantizer.mmdict as mmdict

    aligned = {}

    def spy(*args, **kwargs):
        aligned["weight"], clicks, summary = align_encoder(*args, **kwargs)
        return aligned["weight"], clicks, summary

    monkeypatch.setattr(mmdict, "align_encoder", spy)
    x, cls, events = _taste_world()
    eng = Engagement.from_events(events, np.arange(len(x)))
    content = MmDictQuantizer(_config()).fit(x)
    task = MmDictQuantizer(_config(task_signal=signal)).fit(x, engagement=eng)
    if not task.training_summary.get("task_finetune", {}).get("best_step"):
        # the fit's own steps (rebuilding the content) leave the aligned encoder as it is
        assert torch.equal(task.net.encoder.weight, aligned["weight"])
    align = task.training_summary["task_alignment"]
    assert align["signal"] == signal and align["kept"]
    if signal == "clicks":  # the codes cut in the click model's metric, judged by IDs alone
        assert align["id_check"]["metric_loss"] < align["id_check"]["content_loss"]
    else:
        assert align["best_step"] > 0 and align["valid_loss_best"] < align["valid_loss_init"]
    if signal == "clicks":  # then the click loss end to end through the codes, kept only
        tuned = task.training_summary["task_finetune"]  # where an ID-only model agrees
        assert tuned["steps_run"] > 0 and "id_check" in tuned  # it found a better step
        assert tuned["valid_loss_best"] < tuned["valid_loss_init"]
        assert tuned["id_check"]["kept"] or tuned["best_step"] == 0
    # the codes follow the class users click by, not the loudest content axes
    assert _purity(task.encode(x), cls) > _purity(content.encode(x), cls) + 0.1
    # the fit records what it learned from, and the encoder alone tokenizes
    assert task.fit_info["engagement_sha256"] == eng.sha256()
    assert (task.encode(x[:5]) == task.encode(x)[:5]).all()
    # greedy encoding of the aligned encoder runs through the fused encode op
    task.config.beam_size = task.net.config.beam_size = 1
    with torch.no_grad():
        greedy = task.net.search_codes(task.net.encoder(torch.from_numpy(x))).numpy()
    assert (task.encode(x) == greedy).all()


def test_task_signal_and_engagement_go_together():
    x, _, events = _taste_world(n_items=300, n_events=3000)
    eng = Engagement.from_events(events, np.arange(len(x)))
    with pytest.raises(ValueError, match="task_signal is None"):
        MmDictQuantizer(_config()).fit(x, engagement=eng)
    with pytest.raises(ValueError, match="need both"):
        MmDictQuantizer(_config(task_signal="clicks")).fit(x)
    with pytest.raises(ValueError, match="task_signal must be"):
        _config(task_signal="likes")


def test_cli_names_the_quantizers_task_signals():
    from mmtok.cli import TASK_SIGNAL_CHOICES

    assert sorted(TASK_SIGNAL_CHOICES) == sorted(TASK_SIGNALS)
    assert DEFAULT_TASK_SIGNAL in TASK_SIGNALS


def test_a_cold_item_gets_the_same_codes_whatever_its_later_events(tmp_path):
    """An item without training events is tokenized from its content alone: its codes do
    not change when its validation- and test-period events are removed."""
    from mmdata.contracts import ItemEmbeddings
    from mmtok.bench_ranking import fit_quantizers

    x, _, events = _taste_world(n_items=800, n_events=15_000, seed=1)
    emb = ItemEmbeddings(item_ids=np.arange(len(x), dtype=np.int64), vectors=x)
    events_path = tmp_path / "events.parquet"
    events.write_parquet(events_path)
    split = write_split(events_path, tmp_path / "split", seed=0)
    train = pl.read_parquet(split.train)
    later = pl.concat([pl.read_parquet(split.valid), pl.read_parquet(split.test)])
    cold = np.setdiff1d(later["item_id"].unique().to_numpy(), train["item_id"].to_numpy())
    assert len(cold) > 10  # the protocol's held-out items, with later events

    def fit(valid_test_dir):
        q = MmDictQuantizer(_config(task_signal=DEFAULT_TASK_SIGNAL))
        metrics, codes, _ = fit_quantizers({"task_mmtok": q}, emb, split.train,
                                           valid_test_dir, seed=0, progress=False,
                                           log=lambda _: None)
        return q, metrics["task_mmtok"], pl.read_parquet(codes["task_mmtok"])

    q, metrics, with_later = fit(tmp_path / "run-a")
    # the same fit with the cold items' later events gone from the split
    for part in ("valid", "test"):
        path = getattr(split, part)
        pl.read_parquet(path).filter(~pl.col("item_id").is_in(cold)).write_parquet(path)
    _, _, without_later = fit(tmp_path / "run-b")
    assert with_later.equals(without_later)
    assert metrics["fit_items"] == train["item_id"].n_unique()
    assert metrics["training"]["task_alignment"]["kept"]  # it did align
    cold_rows = np.isin(emb.item_ids, cold)
    assert (with_later.select(q.code_names).to_numpy()[cold_rows] == q.encode(x[cold_rows])).all()


def test_the_id_click_model_scores_codes_by_the_clicks_they_predict_on_held_out_items():
    """The check a fine-tune's codes must pass: an ID-only click model, trained from
    scratch on the other items, predicts held-out items' clicks through shared IDs."""
    x, cls, events = _taste_world()
    eng = Engagement.from_events(events, np.arange(len(x)))
    held = held_out_items(len(x), 0.1, data_seed=0)
    config = AlignmentConfig(signal="clicks")
    by_class = torch.from_numpy(np.stack([cls, cls], 1)).long()
    at_random = torch.from_numpy(np.random.default_rng(0).integers(0, cls.max() + 1,
                                                                   size=(len(x), 2)))
    losses = {name: id_click_losses(codes, [[0], [0, 1]], eng, held, config)
              for name, codes in (("class", by_class), ("random", at_random))}
    assert len(losses["class"]) == int(held[torch.from_numpy(eng.rows)].sum())
    assert losses["class"].mean() < losses["random"].mean() - 0.05


def test_a_task_fit_that_keeps_no_step_gives_the_content_only_codes_bit_for_bit():
    """Where neither the alignment nor the fine-tune keeps a step (here: too few steps to
    score one), the tokenizer is the content one exactly, not a rescaled copy of it."""
    x, _, events = _taste_world(n_items=600, n_users=100, n_events=8000)
    eng = Engagement.from_events(events, np.arange(len(x)))
    content = MmDictQuantizer(_config()).fit(x)
    config = _config(task_signal="clicks")
    config.task_steps = 1
    task = MmDictQuantizer(config).fit(x, engagement=eng)
    summary = task.training_summary
    assert not summary["task_alignment"]["kept"] and summary["task_finetune"]["best_step"] == 0
    for name, tensor in content.net.state_dict().items():
        assert torch.equal(task.net.state_dict()[name], tensor), name
    assert (task.encode(x) == content.encode(x)).all()
