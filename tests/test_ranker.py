import numpy as np
import pytest
import torch

from mmdata import DataContractError, split_events
from quantizer import ResidualKMeansConfig, ResidualKMeansQuantizer
from ranker import (COMPARISONS, FeatureEncoder, IdVocab, ItemContent, RankerConfig, RankingModel,
                    auc, bootstrap_aucs, comparison_intervals, kjt_from_columns, lift_lost,
                    log_loss, normalized_entropy, quantization_loss, train_ranker)
from ranker.data import InMemoryBatches
from ranker.metrics import paired_auc_difference
from ranker.train import (TailAverage, build_model, predict, snapshot_steps,
                          table_learning_rate, train_step)


def test_kjt_on_a_hand_drawn_batch():
    #   keys     user_id      item_id      code_s_0
    #   values   [5  6  7]    [1  0  2]    [3  3  9]
    kjt = kjt_from_columns(["user_id", "item_id", "code_s_0"],
                           [torch.tensor([5, 6, 7]), torch.tensor([1, 0, 2]), torch.tensor([3, 3, 9])])
    assert kjt.keys() == ["user_id", "item_id", "code_s_0"]
    assert kjt.values().tolist() == [5, 6, 7, 1, 0, 2, 3, 3, 9]
    assert kjt.lengths().tolist() == [1] * 9
    assert kjt["item_id"].values().tolist() == [1, 0, 2]
    assert kjt.stride() == 3
    # a multi-hot feature: two ids per example, each example's ids contiguous
    bags = kjt_from_columns(["item_id", "content"], [torch.tensor([1, 0]), torch.tensor([3, 20, 4, 21])],
                            [1, 2])
    assert bags.lengths().tolist() == [1, 1, 2, 2]
    assert [t.tolist() for t in bags["content"].to_dense()] == [[3, 20], [4, 21]]


def test_vocab_maps_unknown_and_rare_ids_to_the_shared_row():
    vocab = IdVocab.fit(np.array([30, 10, 10, 20, 30, 30]), min_count=2)
    assert vocab.num_embeddings == 3
    assert vocab.rows(np.array([10, 30, 20, 99])).tolist() == [1, 2, 0, 0]


@pytest.fixture(scope="module")
def world_split(small_world):
    return split_events(small_world.events, seed=0)


@pytest.fixture(scope="module")
def world_codes(small_world):
    q = ResidualKMeansQuantizer(ResidualKMeansConfig(scale_sizes=[8, 32, 64], seed=0))
    x = small_world.embeddings.vectors
    codes = q.fit(x).encode(x)
    return q, codes


def test_feature_encoder_batches_ids_codes_and_dense(small_world, world_split, world_codes):
    q, codes = world_codes
    content = ItemContent(small_world.embeddings.item_ids, vectors=small_world.embeddings.vectors,
                          codes=codes, code_names=q.code_names, codebook_sizes=q.codebook_sizes)
    fe = FeatureEncoder(world_split.train, content, use_codes=True, use_dense_content=True)
    # the item's six codes are one multi-hot feature over a table stacking their rows
    assert fe.sparse_names == ["user_id", "item_id", "cat_position", "cat_device", "content"]
    assert fe.sparse_sizes[-1] == sum(q.codebook_sizes)
    test = fe.encode(world_split.test)
    cold = test.is_cold.numpy()
    assert cold.any() and (test.sparse[torch.from_numpy(cold), 1] == 0).all()
    index = torch.arange(5)
    dense, kjt, labels = fe.batch(test, index)
    assert dense.shape == (5, 32) and labels.shape == (5,)
    item_ids = world_split.test["item_id"].to_numpy()[:5]
    bag = kjt["content"]
    assert bag.lengths().tolist() == [6] * 5
    offsets = np.cumsum([0, *q.codebook_sizes[:-1]])
    assert (bag.values().view(5, 6).numpy() - offsets).tolist() == codes[item_ids].tolist()
    torch.testing.assert_close(dense, torch.from_numpy(small_world.embeddings.vectors[item_ids]))
    train = fe.encode(world_split.train)
    drop = torch.arange(2000) % 3 == 0
    _, kjt_drop, _ = fe.batch(train, torch.arange(2000), drop_item_id=drop)
    items = kjt_drop["item_id"].values()
    assert (items[drop] == 0).all()
    assert torch.equal(items[~drop], train.sparse[:2000, 1][~drop])


def test_dense_content_is_standardized_per_dimension(small_world, world_split):
    """A unit-norm vector's entries are about 1/sqrt(width); standardized, the content
    enters the bottom MLP on the dense context's scale, and a saved encoder keeps it."""
    content = ItemContent(small_world.embeddings.item_ids, vectors=small_world.embeddings.vectors)
    raw = FeatureEncoder(world_split.train, content, use_codes=False, use_dense_content=True)
    std = FeatureEncoder(world_split.train, content, use_codes=False, use_dense_content=True,
                         standardize_content=True)
    events = std.encode(small_world.events.unique("item_id", keep="first").sort("item_id"))
    dense = std.batch(events, slice(None))[0][:, len(std.dense_names):]  # (items with events, d)
    assert dense.mean(0).abs().max() < 0.05 and (dense.std(0) - 1).abs().max() < 0.05
    assert raw.batch(events, slice(None))[0].std(0).max() < 0.5
    again = FeatureEncoder.from_state(*std.state(), content)
    assert torch.equal(again.batch(events, slice(None))[0], std.batch(events, slice(None))[0])


def test_events_with_unknown_items_are_an_error(small_world, world_split):
    content = ItemContent(np.arange(10), vectors=small_world.embeddings.vectors[:10])
    fe = FeatureEncoder(world_split.train, content, use_codes=False, use_dense_content=True)
    with pytest.raises(DataContractError, match="test events: .* no item embedding"):
        fe.encode(world_split.test, where="test events")


def test_training_lowers_the_loss_and_learns(small_world, world_split, world_codes):
    q, codes = world_codes
    content = ItemContent(small_world.embeddings.item_ids, codes=codes, code_names=q.code_names,
                          codebook_sizes=q.codebook_sizes)
    fe = FeatureEncoder(world_split.train, content, use_codes=True, use_dense_content=False)
    cfg = RankerConfig(epochs=3, patience=3, batch_size=512)
    result = train_ranker(fe, fe.encode(world_split.train), fe.encode(world_split.valid), cfg,
                          progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.valid_auc == max(h["valid_auc"] for h in result.history) > 0.62


def test_step_level_early_stopping_restores_the_best_validation(small_world, world_split,
                                                                world_codes):
    """Validated four times an epoch; tables that learn fast over-fit within an epoch, and
    the model returned scores validation as its best validation did, not its last."""
    q, codes = world_codes
    content = ItemContent(small_world.embeddings.item_ids, codes=codes, code_names=q.code_names,
                          codebook_sizes=q.codebook_sizes)
    fe = FeatureEncoder(world_split.train, content, use_codes=True, use_dense_content=False)
    valid = fe.encode(world_split.valid)
    cfg = RankerConfig(epochs=3, patience=100, validations_per_epoch=4, lr_sparse=0.3,
                       table_warmup_epochs=0, averaged_snapshots=1)
    result = train_ranker(fe, fe.encode(world_split.train), valid, cfg, progress=False)
    steps = [h["step"] for h in result.history]
    assert len(steps) == 12 and steps == sorted(steps)
    assert [h["epoch"] for h in result.history][:4] == [0.25, 0.5, 0.75, 1.0]
    aucs = [h["valid_auc"] for h in result.history]
    best = int(np.argmax(aucs))
    assert best < len(aucs) - 1 and aucs[-1] < aucs[best]  # it over-fitted after its best
    assert result.best_step == steps[best] and result.valid_auc == aucs[best]
    assert auc(valid.labels.numpy(), predict(result.model, fe, valid)) == pytest.approx(aucs[best])
    # patience counts validations: 2 without a better AUC end the run
    early = train_ranker(fe, fe.encode(world_split.train), valid,
                         RankerConfig(**{**cfg.__dict__, "patience": 2,
                                         "patience_counts": "not_better"}), progress=False)
    after_best = len(early.history) - 1 - int(np.argmax([h["valid_auc"] for h in early.history]))
    assert after_best == 2
    # Counting only validations clearly worse than the best (beyond two standard errors
    # of the paired difference) never ends a run sooner, and over 300 validation rows,
    # whose noise hides this over-fitting, it runs every epoch.
    clearly = train_ranker(fe, fe.encode(world_split.train), valid,
                           RankerConfig(**{**cfg.__dict__, "patience": 2}), progress=False)
    assert len(clearly.history) >= len(early.history)
    small = fe.encode(world_split.valid.head(300))
    noisy = [train_ranker(fe, fe.encode(world_split.train), small,
                          RankerConfig(**{**cfg.__dict__, "patience": 2, "patience_counts": c}),
                          progress=False) for c in ("not_better", "clearly_worse")]
    assert len(noisy[0].history) < len(noisy[1].history) == 12


def test_tail_average_scores_the_mean_of_its_window_and_training_goes_on(small_world,
                                                                      world_split):
    """A validation scores (and keeps) the mean of its window's snapshots; the model
    then holds the last step's weights again, and a checkpoint carries the window."""
    assert snapshot_steps({25, 50, 75, 100}, 4) == {7, 13, 19, 25, 32, 38, 44, 50,
                                                    57, 63, 69, 75, 82, 88, 94, 100}
    assert snapshot_steps({3, 6}, 8) == {1, 2, 3, 4, 5, 6}  # a short window: every step
    fe = FeatureEncoder(world_split.train, ItemContent(small_world.embeddings.item_ids,
                                                       vectors=small_world.embeddings.vectors),
                        use_codes=False, use_dense_content=True)
    train, valid = fe.encode(world_split.train), fe.encode(world_split.valid)
    cfg = RankerConfig(table_warmup_epochs=0)
    model, sparse_opt, dense_opt = build_model(fe, cfg)
    average = TailAverage(model)
    source = InMemoryBatches(fe, train, batch_size=cfg.batch_size, seed=0)
    snapshots = []
    for step, batch in enumerate(source.batches(0)):
        train_step(model, sparse_opt, dense_opt, batch)
        if step % 5 == 4:
            average.add()
            snapshots.append([w.clone() for w in average.live])
        if len(snapshots) == 3:
            break
    last = [w.clone() for w in average.live]
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[0], last))  # the weights moved
    mean = [sum(ws) / 3 for ws in zip(*snapshots)]
    with average.applied():
        assert all(torch.allclose(w, m, atol=1e-6) for w, m in zip(average.live, mean))
        scored = predict(model, fe, valid)
    assert all(torch.equal(w, l) for w, l in zip(average.live, last))
    tensors: dict[str, torch.Tensor] = {}
    count = average.to_checkpoint(tensors)
    resumed = TailAverage(model)
    resumed.from_checkpoint(tensors, count)
    with resumed.applied():
        np.testing.assert_array_equal(predict(model, fe, valid), scored)
    average.reset()
    with average.applied():  # no snapshot in the window: the model's own weights
        assert all(torch.equal(w, l) for w, l in zip(average.live, last))
    # In training, the model returned is the one its best validation scored.
    result = train_ranker(fe, train, valid, RankerConfig(epochs=2, averaged_snapshots=4),
                          progress=False)
    assert auc(valid.labels.numpy(), predict(result.model, fe, valid)) == \
        pytest.approx(result.valid_auc, abs=1e-9)


def test_the_content_vector_meets_every_id_in_a_slot_of_its_own(small_world, world_split):
    """content_slot: the dense content vector gets an MLP of its own whose output is one
    more interaction slot (a user . content dot), beside the bottom MLP's mix of content
    and context; it trains, and a model without dense content has no such slot."""
    content = ItemContent(small_world.embeddings.item_ids, vectors=small_world.embeddings.vectors)
    fe = FeatureEncoder(world_split.train, content, use_codes=False, use_dense_content=True)
    assert fe.content_in_features == small_world.embeddings.vectors.shape[1]
    slots = len(fe.sparse_names)
    with_slot = RankingModel.of(fe, RankerConfig())
    without = RankingModel.of(fe, RankerConfig(content_slot=False))
    over_in = lambda m: m.net.over_arch.model[0]._mlp[0]._linear.in_features  # noqa: E731
    # DLRM: the dense slot, then F (+1) more; pairwise dots among them
    assert over_in(without) == 16 + slots * (slots + 1) // 2
    assert over_in(with_slot) == 16 + (slots + 1) * (slots + 2) // 2
    assert without.content_arch is None and with_slot.content_arch is not None
    dense, kjt, labels = fe.batch(fe.encode(world_split.train), torch.arange(256))
    torch.nn.functional.binary_cross_entropy_with_logits(with_slot(dense, kjt), labels).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in with_slot.content_arch.parameters())
    no_content = FeatureEncoder(world_split.train, content, use_codes=False,
                                use_dense_content=False)
    assert no_content.content_in_features == 0
    assert RankingModel.of(no_content, RankerConfig()).content_arch is None
    dcn = RankingModel.of(fe, RankerConfig(interaction="dcn"))
    assert dcn(dense, kjt).shape == (256,)


def test_id_rows_start_small_and_content_rows_silent(small_world, world_split, world_codes):
    """id_init_scale narrows the id tables' initial range (TorchRec's +-sqrt(1/rows)), so
    the MLPs have no loud random dot products to learn while the tables hold still; the
    content-ID rows start at zero, and a scale of 0 (rows that could never differ) is
    refused."""
    q, codes = world_codes
    content = ItemContent(small_world.embeddings.item_ids, codes=codes, code_names=q.code_names,
                          codebook_sizes=q.codebook_sizes)
    fe = FeatureEncoder(world_split.train, content, use_codes=True, use_dense_content=False)
    for scale in (1.0, 0.1):
        torch.manual_seed(0)
        model = RankingModel.of(fe, RankerConfig(id_init_scale=scale))
        for name, table in model.net.sparse_arch.embedding_bag_collection.embedding_bags.items():
            widest = float(table.weight.abs().max())
            if name in ("t_user_id", "t_item_id"):
                bound = scale * (1 / table.weight.shape[0]) ** 0.5
                assert 0.5 * bound < widest <= bound, (name, scale, widest)
            elif name == "t_content":
                assert widest == 0
    with pytest.raises(ValueError, match="id_init_scale"):
        RankerConfig(id_init_scale=0)


def test_paired_auc_difference_matches_the_bootstrap():
    rng = np.random.default_rng(0)
    y = rng.random(4000) < 0.3
    truth = rng.normal(size=4000) + 0.6 * y
    a, b = truth + 0.5 * rng.normal(size=4000), truth + 0.8 * rng.normal(size=4000)
    diff, se = paired_auc_difference(y, a, b)
    assert diff == pytest.approx(auc(y, a) - auc(y, b), abs=1e-12)
    rows = rng.integers(0, 4000, (300, 4000))
    boot = [auc(y[r], a[r]) - auc(y[r], b[r]) for r in rows]
    assert se == pytest.approx(np.std(boot), rel=0.2)
    assert paired_auc_difference(y, b, a) == pytest.approx((-diff, se))
    assert paired_auc_difference(y, a, a) == (0.0, 0.0)


def test_table_reinit_starts_each_later_epoch_from_the_tables_first_pass_start(world_split):
    """table_reinit_each_epoch (MEDA): one step into the third epoch, the tables are their
    state at the start of their first trained epoch (the seeded initial rows, since the
    warm-up held them) but for the rows that step touched; the MLPs are not reset."""
    fe = FeatureEncoder(world_split.train, ItemContent(np.arange(10_000)), use_codes=False,
                        use_dense_content=False)
    train, valid = fe.encode(world_split.train), fe.encode(world_split.valid)
    cfg = RankerConfig(epochs=3, patience=100, table_warmup_epochs=1)
    n = InMemoryBatches(fe, train, batch_size=cfg.batch_size, seed=0).num_batches(0)
    torch.manual_seed(cfg.seed)
    initial = RankingModel.of(fe, cfg).state_dict()
    kept = {}
    for reinit in (True, False):
        model = train_ranker(fe, train, valid, RankerConfig(**{**cfg.__dict__,
                             "table_reinit_each_epoch": reinit}), progress=False,
                             stop_after_steps=2 * n + 1).model
        state = {k.removeprefix("module."): v for k, v in model.state_dict().items()}
        items = state["net.sparse_arch.embedding_bag_collection.embedding_bags.t_item_id.weight"]
        rows = items.local_shards()[0].tensor
        start = initial["net.sparse_arch.embedding_bag_collection.embedding_bags.t_item_id.weight"]
        kept[reinit] = float((rows == start).all(1).float().mean())
        mlp = "net.over_arch.model.1.weight"
        assert not torch.equal(state[mlp], initial[mlp])
    assert kept[True] > 0.5 and kept[False] < 0.05, kept


def test_table_reinit_on_plateau_restarts_the_tables_once_patience_runs_out(world_split):
    """table_reinit_on_plateau: where patience would end the run, it goes on from the
    best step's weights, and the next epoch starts from the tables' first-pass start (the
    seeded rows, but for those its first step touched); the kept step is never worse."""
    fe = FeatureEncoder(world_split.train, ItemContent(np.arange(10_000)), use_codes=False,
                        use_dense_content=False)
    train, valid = fe.encode(world_split.train), fe.encode(world_split.valid)
    cfg = RankerConfig(epochs=6, patience=1, patience_counts="not_better",
                       validations_per_epoch=1, table_warmup_epochs=1)
    plain = train_ranker(fe, train, valid, RankerConfig(**{**cfg.__dict__,
                         "table_reinit_on_plateau": False}), progress=False)
    restarted = train_ranker(fe, train, valid, cfg, progress=False)
    first = restarted.tables_restarted_from_epoch
    assert plain.tables_restarted_from_epoch is None
    assert first is not None and first < cfg.epochs  # the plain run stopped early
    assert len(restarted.history) > len(plain.history)
    assert restarted.history[:len(plain.history)] == plain.history  # the same run until then
    assert restarted.valid_auc >= plain.valid_auc

    n = InMemoryBatches(fe, train, batch_size=cfg.batch_size, seed=0).num_batches(0)
    torch.manual_seed(cfg.seed)
    initial = RankingModel.of(fe, cfg).state_dict()
    model = train_ranker(fe, train, valid, cfg, progress=False,
                         stop_after_steps=first * n + 1).model
    state = {k.removeprefix("module."): v for k, v in model.state_dict().items()}
    key = "net.sparse_arch.embedding_bag_collection.embedding_bags.t_item_id.weight"
    rows = state[key].local_shards()[0].tensor
    assert float((rows == initial[key]).all(1).float().mean()) > 0.5


def test_sparse_learning_rate_decay_reaches_the_fused_table_update(world_split):
    """lr_sparse_decay = 0: the tables learn in epoch 1 only, so two epochs end with the
    tables of one, whichever epoch validation picks."""
    fe = FeatureEncoder(world_split.train, ItemContent(np.arange(10_000)), use_codes=False,
                        use_dense_content=False)
    train, valid = fe.encode(world_split.train), fe.encode(world_split.valid)

    def tables(epochs: int, decay: float) -> dict[str, torch.Tensor]:
        cfg = RankerConfig(epochs=epochs, patience=epochs, lr_sparse_decay=decay,
                           table_warmup_epochs=0, averaged_snapshots=1)
        model = train_ranker(fe, train, valid, cfg, progress=False).model
        return {k: v for k, v in model.state_dict().items() if "embedding_bags" in k}

    one, frozen = tables(1, 0.0), tables(2, 0.0)
    assert one and all(torch.equal(one[k], frozen[k]) for k in one)


@pytest.mark.parametrize("table_optimizer", ["adagrad", "rowwise_adagrad"])
def test_table_warmup_holds_the_tables_but_gathers_their_adagrad_sums(world_split,
                                                                     table_optimizer):
    """In the warm-up epoch the MLPs learn and the tables keep their initial rows, while
    the fused Adagrad still sums the squared gradients of the rows a batch touched (so
    the tables' first real steps are scaled by what the warm-up saw); row-wise Adagrad
    keeps one sum per row, exact Adagrad one per element."""
    fe = FeatureEncoder(world_split.train, ItemContent(np.arange(10_000)), use_codes=False,
                        use_dense_content=False)
    train, valid = fe.encode(world_split.train), fe.encode(world_split.valid)
    cfg = RankerConfig(epochs=3, table_warmup_epochs=1, table_optimizer=table_optimizer)
    model, sparse_opt, dense_opt = build_model(fe, cfg)
    initial = {k: v.local_shards()[0].tensor.clone() for k, v in model.state_dict().items()
               if "embedding_bags" in k}
    mlp = [p.detach().clone() for p in dense_opt.param_groups[0]["params"]]
    for group in sparse_opt.param_groups:
        group["lr"] = table_learning_rate(cfg, 0)
    sparse_opt.step()
    source = InMemoryBatches(fe, train, batch_size=cfg.batch_size, seed=0)
    for _, batch in zip(range(20), source.batches(0)):
        train_step(model, sparse_opt, dense_opt, batch)
    after = {k: v.local_shards()[0].tensor for k, v in model.state_dict().items()
             if "embedding_bags" in k}
    assert initial and all(torch.equal(initial[k], after[k]) for k in initial)
    assert any(not torch.equal(a, p) for a, p in zip(mlp, dense_opt.param_groups[0]["params"]))
    sums = [s.local_shards()[0].tensor for state in sparse_opt.state_dict()["state"].values()
            for s in state.values() if hasattr(s, "local_shards")]
    assert sums and all(float(s.max()) > 0 for s in sums)
    per_row = table_optimizer == "rowwise_adagrad"
    assert all(s.dim() == (1 if per_row else 2) for s in sums)
    assert table_learning_rate(cfg, 1) == cfg.lr_sparse
    with pytest.raises(ValueError, match="table_warmup_epochs"):
        RankerConfig(epochs=1, table_warmup_epochs=1)
    with pytest.raises(ValueError, match="table_optimizer must be one of"):
        RankerConfig(table_optimizer="sgd")


def test_dcn_interaction_builds_and_scores():
    model = RankingModel(["user_id", "item_id"], [5, 7], 3,
                         RankerConfig(interaction="dcn", dense_arch=[8, 16]))
    kjt = kjt_from_columns(["user_id", "item_id"], [torch.tensor([1, 4]), torch.tensor([0, 6])])
    assert model(torch.zeros(2, 3), kjt).shape == (2,)
    with pytest.raises(ValueError, match="dense_arch must end in embedding_dim"):
        RankerConfig(dense_arch=[8, 8])


def test_metric_definitions():
    y = np.array([0, 0, 1, 1])
    assert auc(y, np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert np.isnan(auc(np.array([1, 1]), np.array([0.2, 0.3])))
    assert log_loss(y, np.full(4, 0.5)) == pytest.approx(np.log(2))
    assert normalized_entropy(y, np.full(4, 0.5)) == pytest.approx(1.0)
    assert lift_lost(0.75, 0.7) == pytest.approx(0.2)
    loss = quantization_loss({"dense": {"auc": 0.7, "auc_cold": 0.6},
                              "ids": {"auc": 0.71, "auc_cold": 0.62}, "recon": {"auc": 0.698}})
    assert loss["lift_lost"] == pytest.approx(-0.05)
    assert loss["lift_lost_cold"] == pytest.approx(-0.2)
    assert loss["lift_lost_recon"] == pytest.approx(0.01)


def test_bootstrap_aucs_are_weighted_mann_whitney_on_shared_resamples():
    from ranker.metrics import _SortedScores

    rng = np.random.default_rng(0)
    y = rng.random(4000) < 0.3
    good = y + rng.normal(size=4000)
    tied = np.round(good, 1)  # many ties
    for scores in (good, tied):  # unit weights: exactly the AUC, ties counted half
        assert _SortedScores(y.astype(float), scores).aucs(np.ones((4000, 1)))[0] == \
            pytest.approx(auc(y, scores), abs=1e-12)
    # A weight of 2 counts a row twice: the same as repeating it.
    w = rng.integers(0, 3, size=4000)
    rep = np.repeat(np.arange(4000), w)
    assert _SortedScores(y.astype(float), tied).aucs(w[:, None].astype(float))[0] == \
        pytest.approx(auc(y[rep], tied[rep]), abs=1e-12)
    boot = bootstrap_aucs(y, {"a": good, "b": good.copy(), "seeds": np.stack([good, tied])},
                          subsets={"all": np.ones(4000, bool), "half": np.arange(4000) < 2000},
                          n_boot=400)
    assert np.array_equal(boot["a", "all"], boot["b", "all"])  # paired: the same draws
    assert abs(boot["a", "all"].mean() - auc(y, good)) < 0.003
    # Half the rows leave about sqrt(2) times the spread.
    ratio = boot["a", "half"].std() / boot["a", "all"].std()
    assert 1.2 < ratio < 1.7
    # (S, N) scores: each resample's AUC is the mean over the seeds'.
    assert boot["seeds", "all"].mean() == pytest.approx(
        (auc(y, good) + auc(y, tied)) / 2, abs=0.003)


def test_comparison_intervals_say_which_gaps_the_test_set_resolves():
    rng = np.random.default_rng(1)
    n = 6000
    y = rng.random(n) < 0.3
    cold = np.arange(n) % 5 == 0
    dense = y + rng.normal(size=n)
    scores = {"dense": dense, "recon": dense.copy(),  # no loss at all
              "ids": dense + rng.normal(size=n) * 1.5,  # clearly worse
              "ids_dense": y + rng.normal(size=n),  # as good as dense: a tie
              "no_content": rng.normal(size=n),
              "task_ids": dense.copy()}  # task-aware IDs: clearly better than ids
    out = comparison_intervals(y, cold, scores | {"lsh_ids": scores["no_content"]}, n_boot=300)
    # task_ids is compared with ids (not as a baseline: no ids_vs_task_ids)
    assert set(out) == set(COMPARISONS) | {"ids_vs_lsh_ids", "content_lift_lost_lsh_ids",
                                           "content_lift_lost_task_ids"}
    assert out["ids_vs_lsh_ids"]["reference"] == "lsh_ids" and out["ids_vs_lsh_ids"]["low"] > 0
    assert out["task_ids_vs_ids"]["low"] > 0 and out["task_ids_vs_ids_cold"]["rows"] == "cold"
    recon = out["lift_lost_recon"]
    assert recon["value"] == recon["low"] == recon["high"] == 0 and recon["p_under_bar"] == 1
    ids = out["lift_lost"]
    assert ids["value"] == pytest.approx(lift_lost(auc(y, dense), auc(y, scores["ids"])))
    assert 0 < ids["low"] < ids["value"] < ids["high"] and ids["p_favourable"] == 0
    tie = out["ids_dense_vs_dense"]
    assert tie["low"] < 0 < tie["high"] and 0.05 < tie["p_favourable"] < 0.95
    assert out["ids_vs_no_content_cold"]["low"] > 0  # the cold rows alone resolve this
    # No cold test rows: the cold comparisons are left out, not NaN.
    assert set(comparison_intervals(y, np.zeros(n, bool), scores, n_boot=10)) == \
        {"lift_lost", "lift_lost_recon", "ids_dense_vs_dense", "content_lift_lost",
         "content_lift_lost_recon", "dense_vs_no_content", "task_ids_vs_ids",
         "content_lift_lost_task_ids"}
    # content_lift_lost: the share of what content adds over no_content that ids loses.
    entry = out["content_lift_lost"]
    assert entry["value"] == pytest.approx(
        (auc(y, dense) - auc(y, scores["ids"])) / (auc(y, dense) - auc(y, scores["no_content"])))
    assert entry["low"] < entry["value"] < entry["high"]
    # Only the comparisons whose variants ran.
    assert set(comparison_intervals(y, cold, {"dense": dense, "recon": dense}, n_boot=10)) == \
        {"lift_lost_recon"}


def test_intervals_widen_when_the_training_seeds_disagree():
    """Three seeds of each variant: when they agree, the interval is the test rows'; when
    one seed of ids is much worse, the seed draws widen it, and a single-seed reading
    of the same gap would look clear."""
    rng = np.random.default_rng(2)
    n = 6000
    y = rng.random(n) < 0.3
    dense = np.stack([y + rng.normal(size=n) for _ in range(3)])  # (S, N)
    agree = np.stack([y + rng.normal(size=n) * 1.1 for _ in range(3)])
    disagree = agree.copy()
    disagree[0] = y + rng.normal(size=n) * 3.0  # one bad seed
    def width(ids):
        e = comparison_intervals(y, np.zeros(n, bool), {"dense": dense, "ids": ids},
                                 n_boot=400)["lift_lost"]
        return e["high"] - e["low"]
    assert width(disagree) > 1.5 * width(agree)
    rows_only = bootstrap_aucs(y, {"ids": disagree}, n_boot=400, resample_seeds=False)
    with_seeds = bootstrap_aucs(y, {"ids": disagree}, n_boot=400)
    assert with_seeds["ids", "all"].std() > 2 * rows_only["ids", "all"].std()


def test_prefix_ngrams_read_a_residual_code_with_its_center():
    from ranker.features import prefix_ngram_codes

    #  code_s_0 code_s_1 code_m_0 code_m_1
    codes = np.array([[1, 2, 5, 0],
                      [1, 3, 5, 0],
                      [0, 2, 7, 9]])
    names, sizes, ngrams = prefix_ngram_codes(codes, ["code_s_0", "code_s_1", "code_m_0", "code_m_1"],
                                              [4, 4, 8, 10])
    assert names == ["ngram_s_1", "ngram_m_1"] and sizes == [16, 80]
    assert ngrams[:, 0].tolist() == [1 * 4 + 2, 1 * 4 + 3, 0 * 4 + 2]  # (center, residual) pairs
    assert ngrams[:, 1].tolist() == [5 * 10 + 0, 5 * 10 + 0, 7 * 10 + 9]
    content = ItemContent(np.arange(3), codes=codes, code_names=["code_s_0", "code_s_1", "code_m_0",
                                                                  "code_m_1"], codebook_sizes=[4, 4, 8, 10])
    import polars as pl
    events = pl.DataFrame({"user_id": [1, 2, 3], "item_id": [0, 1, 2], "ts": [0, 1, 2], "label": [0, 1, 0]})
    fe = FeatureEncoder(events, content, use_codes=True, use_dense_content=False, prefix_ngrams=True,
                        code_pooling="per_feature")
    assert fe.sparse_names[-2:] == ["ngram_s_1", "ngram_m_1"] and fe.sparse_sizes[-2:] == [16, 80]
    _, kjt, _ = fe.batch(fe.encode(events), torch.tensor([2, 0]))
    assert kjt["ngram_s_1"].values().tolist() == [2, 6]


def test_chain_ngrams_read_each_code_under_every_code_before_it():
    from ranker.features import NGRAM_BUCKETS, prefix_ngram_codes

    names4 = ["code_s_0", "code_s_1", "code_m_0", "code_m_1"]
    codes = np.array([[1, 2, 5, 0],
                      [1, 3, 5, 0],
                      [0, 2, 7, 9]])
    names, sizes, ngrams = prefix_ngram_codes(codes, names4, [4, 4, 8, 10], "chain")
    assert names == ["ngram_s_1", "ngram_m_0", "ngram_m_1"] and sizes == [16, 128, 1280]
    assert ngrams[:, 1].tolist() == [(1 * 4 + 2) * 8 + 5, (1 * 4 + 3) * 8 + 5, (0 * 4 + 2) * 8 + 7]
    # Rows 0 and 1 share m_0 = 5 and m_1 = 0 but not the prefix: chain n-grams tell them apart.
    assert ngrams[0, 2] != ngrams[1, 2]
    # A chain longer than the table: hashed into NGRAM_BUCKETS rows, the whole prefix still
    # counting (items that differ only in their first code land apart).
    long = np.zeros((2, 6), np.int64)
    long[1, 0] = 1
    names, sizes, ngrams = prefix_ngram_codes(long, [f"code_{s}_{l}" for s in "sml" for l in (0, 1)],
                                              [16, 16, 64, 64, 256, 256], "chain")
    assert sizes[-1] == NGRAM_BUCKETS and 0 <= ngrams.min() and ngrams.max() < NGRAM_BUCKETS
    assert ngrams[0, -1] != ngrams[1, -1]
    with pytest.raises(ValueError, match="prefix_ngrams must be one of"):
        RankerConfig(prefix_ngrams="chains")
    assert RankerConfig(prefix_ngrams=True).prefix_ngrams == "per_scale"  # old job files


def test_content_id_values_few_training_items_share_go_to_the_oov_row():
    import polars as pl

    names = ["code_s_0", "code_s_1"]
    #  items 0-3 trained; item 4 cold (its codes count for nothing)
    codes = np.array([[1, 2], [1, 3], [1, 2], [0, 2], [0, 3]])
    content = ItemContent(np.arange(5), codes=codes, code_names=names, codebook_sizes=[4, 4])
    events = pl.DataFrame({"user_id": [1, 2, 3, 4], "item_id": [0, 1, 2, 3], "ts": [0, 1, 2, 3],
                           "label": [0, 1, 0, 1]})
    fe = FeatureEncoder(events, content, use_codes=True, use_dense_content=False,
                        prefix_ngrams=True, min_code_items=2, code_pooling="per_feature")
    # code_s_0: value 1 has 3 items (kept), value 0 one (pruned). code_s_1: 2 -> 3 items, 3 -> 1.
    # ngram_s_1: (1, 2) -> 2 items kept; (1, 3) and (0, 2) -> 1 item each, pruned.
    assert fe.sparse_sizes[-3:] == [2, 2, 2]
    cold = pl.DataFrame({"user_id": [9], "item_id": [4], "ts": [9], "label": [0]})
    _, kjt, _ = fe.batch(fe.encode(pl.concat([events, cold])), torch.arange(5))
    assert kjt["code_s_0"].values().tolist() == [1, 1, 1, 0, 0]
    assert kjt["code_s_1"].values().tolist() == [1, 0, 1, 1, 0]
    assert kjt["ngram_s_1"].values().tolist() == [1, 0, 1, 0, 0]
    # The serving path rebuilds the same rows from the saved state.
    meta, arrays = fe.state()
    again = FeatureEncoder.from_state(meta, arrays, content)
    _, kjt2, _ = again.batch(again.encode(pl.concat([events, cold])), torch.arange(5))
    assert kjt2.values().tolist() == kjt.values().tolist()
    assert again.sparse_sizes == fe.sparse_sizes


def test_content_features_of_raw_codes_are_the_rows_a_batch_gathers():
    """A brand-new ad's content is built online by the function that built the offline
    table: n-grams, pruned values, bag offsets and the user cross all agree."""
    import polars as pl

    #  code_s_0 code_s_1 code_m_0
    codes = np.array([[1, 2, 5], [1, 3, 0], [1, 2, 7], [0, 2, 5], [0, 3, 7]])
    content = ItemContent(np.arange(5), codes=codes,
                          code_names=["code_s_0", "code_s_1", "code_m_0"], codebook_sizes=[4, 4, 8])
    events = pl.DataFrame({"user_id": [1, 2, 3, 1, 2], "item_id": [0, 1, 2, 3, 4],
                           "ts": [0, 1, 2, 3, 4], "label": [0, 1, 0, 1, 0]})
    fe = FeatureEncoder(events.head(4), content, use_codes=True, use_dense_content=False,
                        prefix_ngrams=True, min_code_items=2, code_pooling="per_scale",
                        user_cross="code_s_0")
    assert fe.sparse_names == ["user_id", "item_id", "content_s", "content_m", "user_x_code_s_0"]
    encoded = fe.encode(events)
    for index in (torch.tensor([4, 0, 2]), torch.tensor([3]), torch.arange(0)):
        dense, kjt, _ = fe.batch(encoded, index)
        columns = fe.content_features(codes[index.numpy()])  # as if they were new ads
        assert columns.bags.shape == (len(index), 4)  # code_s_0, code_s_1, ngram_s_1 | code_m_0
        online, online_kjt = fe.model_inputs(encoded.sparse[index], encoded.dense_ctx[index],
                                             columns)
        assert online_kjt.keys() == kjt.keys()
        assert online_kjt.values().tolist() == kjt.values().tolist()
        assert online_kjt.lengths().tolist() == kjt.lengths().tolist()
        torch.testing.assert_close(online, dense)


def test_a_content_bag_pools_what_separate_code_tables_summed_would():
    import polars as pl

    #  code_s_0 code_s_1 code_m_0
    codes = np.array([[1, 2, 5], [1, 3, 0], [0, 2, 7]])
    content = ItemContent(np.arange(3), codes=codes, code_names=["code_s_0", "code_s_1", "code_m_0"],
                          codebook_sizes=[4, 4, 8])
    events = pl.DataFrame({"user_id": [1, 2, 3], "item_id": [0, 1, 2], "ts": [0, 1, 2], "label": [0, 1, 0]})

    def encoder(pooling):
        return FeatureEncoder(events, content, use_codes=True, use_dense_content=False,
                              prefix_ngrams=True, code_pooling=pooling)

    separate = encoder("per_feature")  # code_s_0 code_s_1 code_m_0 ngram_s_1: 4 tables
    assert separate.sparse_names[2:] == ["code_s_0", "code_s_1", "code_m_0", "ngram_s_1"]
    model = RankingModel(separate.sparse_names, separate.sparse_sizes, 1,
                         RankerConfig(code_pooling="per_feature", code_init="uniform"))
    index = torch.tensor([2, 0, 1])
    pooled = model.net.sparse_arch(separate.batch(separate.encode(events), index)[1])  # (B, 6, D)
    tables = {name: model.state_dict()[f"net.sparse_arch.embedding_bag_collection.embedding_bags."
                                       f"t_{name}.weight"] for name in separate.sparse_names}
    for pooling, bags in [("summed", {"content": ["code_s_0", "code_s_1", "code_m_0", "ngram_s_1"]}),
                          ("per_scale", {"content_s": ["code_s_0", "code_s_1", "ngram_s_1"],
                                         "content_m": ["code_m_0"]})]:
        fe = encoder(pooling)
        assert fe.sparse_names == ["user_id", "item_id", *bags]
        bag_model = RankingModel(fe.sparse_names, fe.sparse_sizes, 1,
                                 RankerConfig(code_pooling=pooling, code_init="uniform"))
        stacked = {f"net.sparse_arch.embedding_bag_collection.embedding_bags.t_{bag}.weight":
                   torch.cat([tables[name] for name in members]) for bag, members in bags.items()}
        bag_model.load_state_dict(stacked, strict=False)  # the same rows, one table per bag
        got = bag_model.net.sparse_arch(fe.batch(fe.encode(events), index)[1])
        assert got.shape == (3, 2 + len(bags), 16)
        for slot, members in enumerate(bags.values(), start=2):
            cols = [separate.sparse_names.index(name) for name in members]
            torch.testing.assert_close(got[:, slot], pooled[:, cols].sum(1))
    fe = encoder("summed")
    silent = RankingModel(fe.sparse_names, fe.sparse_sizes, 1, RankerConfig(code_init="zeros"))
    kjt = fe.batch(fe.encode(events), index)[1]
    assert torch.count_nonzero(silent.net.sparse_arch(kjt)[:, 2]) == 0
    assert torch.count_nonzero(silent.net.sparse_arch(kjt)[:, 0]) > 0
    with pytest.raises(ValueError, match="code_pooling must be one of"):
        encoder("per_code")


def test_the_user_is_crossed_with_the_coarsest_content_id():
    import polars as pl

    #  code_s_0 code_s_1 code_m_0
    codes = np.array([[1, 2, 5], [1, 3, 0], [0, 2, 7]])
    content = ItemContent(np.arange(3), codes=codes, code_names=["code_s_0", "code_s_1", "code_m_0"],
                          codebook_sizes=[4, 4, 8])
    events = pl.DataFrame({"user_id": [10, 20, 10], "item_id": [0, 1, 2], "ts": [0, 1, 2],
                           "label": [0, 1, 0]})
    assert "user_x_code_s_0" not in FeatureEncoder.from_config(
        events, content, RankerConfig(), use_codes=True, use_dense_content=False).sparse_names
    crossed = RankerConfig(user_code_cross="coarsest")
    fe = FeatureEncoder.from_config(events, content, crossed, use_codes=True,
                                    use_dense_content=False)
    assert fe.sparse_names == ["user_id", "item_id", "content", "user_x_code_s_0"]
    assert fe.sparse_sizes[-1] == 3 * 4  # (2 users + the unknown-user row) x 4 values
    stranger = pl.DataFrame({"user_id": [99], "item_id": [2], "ts": [3], "label": [0]})
    scored = fe.encode(pl.concat([events, stranger]))
    _, kjt, _ = fe.batch(scored, torch.arange(4))
    # user rows 1, 2, 1 and 0 (unknown), times 4 values, plus the item's code_s_0
    assert kjt["user_x_code_s_0"].values().tolist() == [1 * 4 + 1, 2 * 4 + 1, 1 * 4 + 0, 0 * 4 + 0]
    again = FeatureEncoder.from_state(*fe.state(), content)
    assert again.batch(scored, torch.arange(4))[1].values().tolist() == kjt.values().tolist()
    named = FeatureEncoder(events, content, use_codes=True, use_dense_content=False,
                           user_cross="code_m_0")
    assert named.sparse_names[-1] == "user_x_code_m_0" and named.sparse_sizes[-1] == 3 * 8
    assert FeatureEncoder.from_config(events, content, RankerConfig(), use_codes=False,
                                      use_dense_content=False).sparse_names == ["user_id", "item_id"]
    # With the dense vector in its own slot (ids_dense) the cross is left out; without
    # the slot the config's cross stands.
    content.vectors = np.eye(3, 4, dtype=np.float32)
    for slot, crossed in ((True, False), (False, True)):
        both = FeatureEncoder.from_config(events, content,
                                          RankerConfig(content_slot=slot, user_code_cross="coarsest"),
                                          use_codes=True, use_dense_content=True)
        assert ("user_x_code_s_0" in both.sparse_names) == crossed
    with pytest.raises(ValueError, match="user_cross must be"):
        FeatureEncoder(events, content, use_codes=True, use_dense_content=False, user_cross="code_x")
    with pytest.raises(ValueError, match="needs the content IDs"):
        FeatureEncoder(events, content, use_codes=False, use_dense_content=False, user_cross="coarsest")


def test_decoded_rows_start_each_bag_at_its_items_content():
    """code_init "decoded": an item's summed content bag starts as a low-dimensional view
    of what its codes decode to, learned from the training items only."""
    import polars as pl

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 6)) * 3
    # 24 items: code_s_0 = cluster (4), code_s_1 = a refinement (3 values); item 23 alone
    # uses code_s_1 = 3 and has no training events.
    codes = np.array([[i % 4, (i // 4) % 3] for i in range(24)])
    codes[23] = [3, 3]
    decoded = (centers[codes[:, 0]] + 0.3 * rng.normal(size=(24, 6))).astype(np.float32)
    content = ItemContent(np.arange(24), codes=codes, code_names=["code_s_0", "code_s_1"],
                          codebook_sizes=[4, 4], decoded=decoded)
    events = pl.DataFrame({"user_id": np.arange(23) % 5, "item_id": np.arange(23),
                           "ts": np.arange(23), "label": np.arange(23) % 2})
    fe = FeatureEncoder(events, content, use_codes=True, use_dense_content=False)
    rows = fe.decoded_rows(4)["content"]  # code_s_0's 4 rows, then code_s_1's 4
    assert rows.shape == (8, 4)
    assert not rows[7].any() and rows[:7].any(axis=1).all()  # no training item uses s1=3

    model = RankingModel.of(fe, RankerConfig(code_init="decoded"))
    _, kjt, _ = fe.batch(fe.encode(events), torch.arange(23))
    bags = model.net.sparse_arch(kjt)[:, 2].detach()  # (23, 16): the summed content slot
    assert torch.count_nonzero(bags[:, 6:]) == 0  # 6-wide decoded vectors fill 6 of 16 dims
    # Each item's nearest other item, by its starting bag, is in its own cluster.
    distance = torch.cdist(bags, bags) + torch.eye(23) * 1e9
    nearest = distance.argmin(dim=1).numpy()
    assert (codes[nearest, 0] == codes[:23, 0]).all()
    zeros = RankingModel.of(fe, RankerConfig(code_init="zeros"))
    assert torch.count_nonzero(zeros.net.sparse_arch(kjt)[:, 2]) == 0
    # Without decoded vectors (a bundle's encoder) the rows stay silent, and asking for
    # them says why.
    plain = FeatureEncoder(events, ItemContent(np.arange(24), codes=codes,
                                               code_names=["code_s_0", "code_s_1"],
                                               codebook_sizes=[4, 4]),
                           use_codes=True, use_dense_content=False)
    assert torch.count_nonzero(RankingModel.of(plain, RankerConfig()).net.sparse_arch(kjt)[:, 2]) == 0
    with pytest.raises(ValueError, match="needs ItemContent.decoded"):
        plain.decoded_rows(4)
