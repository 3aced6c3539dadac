"""Training at scale: streamed batches, TOML jobs, torchrun + DMP, checkpoints and resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from mmdata import DataContractError, split_events, write_split
from quantizer import ResidualKMeansConfig, ResidualKMeansQuantizer, encode_items, save_quantizer
from ranker import FeatureEncoder, ItemContent, RankerConfig, RankingModel, ServableModel
from ranker.checkpoint import CheckpointError, load_checkpoint
from ranker.data import InMemoryBatches, ParquetBatches, Shard
from ranker.job import PREDICTIONS_FILE, TrainJob, load_item_content, run_train_job
from ranker.train import FrequencyL2

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world_files(small_world, tmp_path_factory):
    """The small synthetic world on disk: split (small row groups), codes, embeddings."""
    root = tmp_path_factory.mktemp("world")
    paths = small_world.write(root)
    split = write_split(paths["events"], root / "split", seed=0, row_group_rows=2048)
    q = ResidualKMeansQuantizer(ResidualKMeansConfig(scale_sizes=[8, 32, 64], seed=0))
    q.fit(small_world.embeddings.vectors)
    encode_items(q, small_world.embeddings).write_parquet(root / "codes.parquet")
    save_quantizer(q, root / "quantizer")
    return {"root": root, "split": split, **paths, "codes": root / "codes.parquet",
            "quantizer": root / "quantizer"}


def _job(world_files, out, **kw) -> TrainJob:
    ranker = kw.pop("ranker", RankerConfig(epochs=2, patience=1))
    kw.setdefault("variant", "ids")
    return TrainJob(split_dir=str(world_files["root"] / "split"), out=str(out),
                    item_codes=str(world_files["codes"]), quantizer=str(world_files["quantizer"]),
                    ranker=ranker, **kw)


def test_streamed_split_matches_the_in_memory_split(small_world, world_files):
    mem = split_events(small_world.events, seed=0)
    files = world_files["split"]
    for name in ("train", "valid", "test"):
        on_disk = pl.read_parquet(getattr(files, name))
        expected = getattr(mem, name)
        assert on_disk.height == expected.height
        key = ["ts", "user_id", "item_id"]
        assert on_disk.sort(key).equals(expected.select(on_disk.columns).sort(key))
    # Training rows are shuffled on disk (a streaming reader needs mixed row groups).
    assert not pl.read_parquet(files.train)["ts"].is_sorted()
    assert files.summary["test"]["cold_rows"] == int(mem.test["is_cold"].sum())


def test_parquet_batches_shard_the_rows_and_replay_exactly(world_files):
    train = pl.scan_parquet(world_files["split"].train)
    content = ItemContent(np.arange(10_000))
    features = FeatureEncoder(train, content, use_codes=False, use_dense_content=False)
    # batch_size is the global batch: each of 2 ranks takes 256 rows a step.
    batches = {r: ParquetBatches(world_files["split"].train, features, batch_size=512, seed=3,
                                 shard=Shard(r, 2), buffer_groups=2) for r in (0, 1)}
    n = batches[0].num_batches(0)
    assert n == batches[1].num_batches(0) > 0
    for source in batches.values():
        assert [len(b[2]) for b in source.batches(0)] == [256] * n
    # Resuming at step k yields exactly the batches k.. of an uninterrupted epoch.
    full = [b[1].values() for b in batches[0].batches(1, item_id_dropout=0.3)]
    tail = [b[1].values() for b in batches[0].batches(1, item_id_dropout=0.3, start=5)]
    assert len(tail) == len(full) - 5
    assert all(torch.equal(a, b) for a, b in zip(full[5:], tail))
    # Each epoch reads a different order.
    first0 = next(batches[0].batches(0))[1].values()
    first1 = next(batches[0].batches(1))[1].values()
    assert not torch.equal(first0, first1)
    # One process keeps every row but a batch: the streams hold equal rows, and a
    # stream's batches run on across its buffers.
    single = ParquetBatches(world_files["split"].train, features, batch_size=256, seed=3)
    assert single.num_rows - single.num_batches(0) * 256 < 256 + 4 * 8


def test_parquet_batches_do_not_depend_on_the_number_of_processes(world_files):
    """Streamed, 1, 2 and 4 processes train on the same global batches and item-id drops,
    each rank reading only its own streams of the file."""
    path = world_files["split"].train
    features = FeatureEncoder(pl.scan_parquet(path), ItemContent(np.arange(10_000)),
                              use_codes=False, use_dense_content=False)

    def global_batches(world_size: int, start: int = 0) -> list[tuple]:
        sources = [ParquetBatches(path, features, batch_size=512, seed=5, buffer_groups=2,
                                  shard=Shard(r, world_size)) for r in range(world_size)]
        steps = zip(*(s.batches(2, item_id_dropout=0.3, start=start) for s in sources))
        out = []
        for parts in steps:
            rows = [torch.stack([p[1]["user_id"].values(), p[1]["item_id"].values(), p[2]])
                    for p in parts]
            # Rank r holds streams r, r + N, ...: put each stream's 128 rows back in order.
            chunks = {v: rows[r][:, k * 128:(k + 1) * 128]
                      for r in range(world_size) for k, v in enumerate(range(r, 4, world_size))}
            out.append(torch.cat([chunks[v] for v in range(4)], dim=1))
        return out

    one = global_batches(1)
    assert len(one) > 10
    dropped = sum(int((b[1] == 0).sum()) for b in one)  # OOV item row
    assert 0.2 < dropped / (len(one) * 512) < 0.4
    for world_size in (2, 4):
        assert all(torch.equal(a, b) for a, b in zip(one, global_batches(world_size), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(one[3:], global_batches(2, start=3), strict=True))
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        ParquetBatches(path, features, batch_size=512, seed=0, shard=Shard(0, 3))


def test_a_file_of_one_row_group_still_feeds_every_rank(tmp_path, world_files):
    one_group = tmp_path / "train.parquet"
    pl.read_parquet(world_files["split"].train).write_parquet(one_group, row_group_size=10**7)
    features = FeatureEncoder(pl.scan_parquet(one_group), ItemContent(np.arange(10_000)),
                              use_codes=False, use_dense_content=False)
    sources = [ParquetBatches(one_group, features, batch_size=512, seed=0, shard=Shard(r, 2))
               for r in (0, 1)]
    n = sources[0].num_batches(0)
    assert n == sources[1].num_batches(0) and n * 2 * 256 > sources[0].num_rows - 512
    rows = [torch.cat([b[1]["user_id"].values() for b in s.batches(0)]) for s in sources]
    assert len(rows[0]) == len(rows[1]) == n * 256
    assert len(sources[0]._piece_rows) == 4 * 8  # the one group is cut into pieces
    with pytest.raises(ValueError, match="no full batch"):
        ParquetBatches(one_group, features, batch_size=10**6, seed=0, shard=Shard(0, 2))


def test_in_memory_batches_give_every_rank_the_same_steps(small_world):
    events = split_events(small_world.events, seed=0).train
    features = FeatureEncoder(events, ItemContent(np.arange(10_000)), use_codes=False,
                              use_dense_content=False)
    encoded = features.encode(events)
    sources = [InMemoryBatches(features, encoded, batch_size=1000, seed=0, shard=Shard(r, 2))
               for r in (0, 1)]
    assert sources[0].num_batches(0) == sources[1].num_batches(0)
    assert sum(len(b[2]) for b in sources[0].batches(0)) == len(encoded) // 2
    # batch_size is the global batch: at every step the two ranks' halves are exactly
    # the one-process batch, item-id dropout draws included.
    single = InMemoryBatches(features, encoded, batch_size=1000, seed=0)
    assert single.num_batches(0) == sources[0].num_batches(0)
    steps = zip(single.batches(0, item_id_dropout=0.3),
                *(s.batches(0, item_id_dropout=0.3) for s in sources))
    for one, *halves in steps:
        assert len(halves[0][2]) == len(halves[1][2])
        n = 2 * len(halves[0][2])  # the last step: the one-process tail may hold a row more
        for key in ("user_id", "item_id"):
            whole = one[1][key].values()[:n]
            assert torch.equal(torch.sort(whole).values,
                               torch.sort(torch.cat([h[1][key].values() for h in halves])).values)
            assert torch.equal(whole[0::2], halves[0][1][key].values())
    with pytest.raises(ValueError, match="divide evenly"):
        InMemoryBatches(features, encoded, batch_size=999, seed=0, shard=Shard(0, 2))


@pytest.fixture(scope="module")
def crossed_features(world_files):
    """The ids variant's encoder (codes, n-grams, the user x coarsest-code cross) and its
    encoded training events."""
    train = pl.read_parquet(world_files["split"].train)
    content = load_item_content(_job(world_files, world_files["root"] / "unused"))
    features = FeatureEncoder.from_config(train, content, RankerConfig(user_code_cross="coarsest"),
                                          use_codes=True, use_dense_content=False)
    return features, features.encode(train), train


def test_cross_id_dropout_reads_the_cold_user_row_in_training_only(crossed_features):
    features, encoded, _ = crossed_features
    cross = features.cross_names[0]
    values = features.code_sizes[features.code_names.index(features.user_cross)]  # per user
    source = InMemoryBatches(features, encoded, batch_size=1000, seed=0)
    plain = list(source.batches(0, item_id_dropout=0.1))
    dropped = list(source.batches(0, item_id_dropout=0.1, cross_id_dropout=0.3))
    cold = same = 0
    for (_, kjt, _), (_, kjt_drop, _) in zip(plain, dropped, strict=True):
        # The item-id draws are their own: crossing dropout leaves them as they were.
        assert torch.equal(kjt["item_id"].values(), kjt_drop["item_id"].values())
        rows, rows_drop = kjt[cross].values(), kjt_drop[cross].values()
        changed = rows != rows_drop
        assert (rows >= values).all()  # every training user is in the vocabulary
        # A dropped cross is the out-of-vocabulary user's row of the same content value.
        assert torch.equal(rows_drop[changed], rows[changed] % values)
        cold += int(changed.sum())
        same += int((~changed).sum())
    assert 0.25 < cold / (cold + same) < 0.35
    # Evaluation batches never drop: every cross row is the user's own.
    _, kjt, _ = features.batch(encoded, torch.arange(2000))
    assert (kjt[cross].values() >= values).all()
    with pytest.raises(ValueError, match="cross_id_dropout"):
        RankerConfig(cross_id_dropout=1.0)


def test_frequency_l2_pulls_each_row_by_one_over_its_count(crossed_features):
    features, encoded, train = crossed_features
    counts = features.id_row_counts
    # Training counts per row; the shared out-of-vocabulary rows are not regularised.
    items, n = np.unique(train["item_id"].to_numpy(), return_counts=True)
    rows = features.vocabs["item_id"].rows(items)
    assert counts["item_id"][rows].tolist() == n.tolist() and counts["item_id"][0] == 0
    cross = features.cross_names[0]
    assert counts[cross].sum() == train.height
    id_l2 = FrequencyL2.of(features, 0.5)
    assert FrequencyL2.of(features, 0.0) is None
    assert set(id_l2.inverse_counts) == {"user_id", "item_id", "cat_position", "cat_device", cross}

    torch.manual_seed(0)
    model = RankingModel.of(features, RankerConfig())
    tables = model.net.sparse_arch.embedding_bag_collection.embedding_bags
    with torch.no_grad():
        for table in tables.values():
            table.weight.normal_()
    batch = 64
    drop = torch.arange(batch) % 4 == 0  # some examples read the OOV item row
    dense, kjt, _ = features.batch(encoded, torch.arange(batch), drop_item_id=drop)
    logits, embedded = model(dense, kjt, with_embeddings=True)
    assert embedded.shape == (batch, len(features.sparse_names), 16)
    torch.testing.assert_close(logits, model(dense, kjt))
    penalty = id_l2.penalty(kjt, embedded)
    weight = tables["t_item_id"].weight
    grad, content_grad = torch.autograd.grad(penalty, [weight, tables["t_content"].weight])
    # d/d row of 0.5 * mean_b ||row||^2 / count: 2 * 0.5 * (uses in the batch) * row / (count * B)
    item_rows = kjt["item_id"].values()
    uses = torch.bincount(item_rows, minlength=len(weight)).float()
    inverse = torch.from_numpy(counts["item_id"]).float()
    inverse = torch.where(inverse > 0, 1 / inverse.clamp(min=1), 0.0)
    expected = (uses * inverse / batch)[:, None] * weight.detach()
    torch.testing.assert_close(grad, expected)
    assert grad[0].abs().sum() == 0 and (item_rows == 0).any()  # the OOV row is left alone
    assert content_grad.abs().sum() == 0  # content IDs are shared rows, not regularised
    with pytest.raises(ValueError, match="id_l2_frequency"):
        RankerConfig(id_l2_frequency=-1.0)


def test_id_regularisers_train_end_to_end(tmp_path, world_files):
    """Both options run through DMP's fused table update; the logged loss is the BCE."""
    config = RankerConfig(epochs=2, patience=2, validations_per_epoch=1, id_l2_frequency=1.0,
                          cross_id_dropout=0.2, user_code_cross="coarsest")
    metrics = run_train_job(_job(world_files, tmp_path / "run", ranker=config, streaming=False),
                            progress=False)
    assert metrics["auc"] > 0.55
    assert all(0.2 < h["train_loss"] < 1.0 for h in metrics["history"])


def test_job_toml_round_trip_and_bad_keys(tmp_path, world_files):
    job = _job(world_files, tmp_path / "run", checkpoint_every=7)
    path = tmp_path / "job.toml"
    path.write_text(job.to_toml())
    again = TrainJob.from_toml(path)
    assert again == job
    path.write_text(job.to_toml() + "\nbatchsize = 3\n")
    with pytest.raises(ValueError, match=r"\[ranker\] keys \['batchsize'\]"):
        TrainJob.from_toml(path)
    with pytest.raises(ValueError, match="needs item_codes, quantizer"):
        TrainJob(split_dir="x", out="y", variant="ids")
    with pytest.raises(ValueError, match="choose from"):
        TrainJob(split_dir="x", out="y", variant="idz")


@pytest.mark.parametrize("variant", ["no_content", "dense", "recon", "ids", "ids_dense"])
def test_every_variant_trains_and_its_loss_falls(tmp_path, world_files, variant):
    job = TrainJob(split_dir=str(world_files["root"] / "split"), out=str(tmp_path), variant=variant,
                   item_codes=str(world_files["codes"]), quantizer=str(world_files["quantizer"]),
                   item_embeddings=str(world_files["item_embeddings"]),
                   ranker=RankerConfig(epochs=2, patience=2, lr_dense=3e-3))
    metrics = run_train_job(job, progress=False)
    losses = [h["train_loss"] for h in metrics["history"]]
    assert losses[1] < losses[0]
    assert metrics["auc"] > 0.55
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["auc"] == pytest.approx(metrics["auc"])
    # Every job leaves a servable model whose scores are the job's own test predictions.
    served = ServableModel.load(tmp_path / "model")
    assert served.model_version == saved["model_version"]
    test_events = pl.read_parquet(world_files["root"] / "split" / "test.parquet")
    probs = served.score_events(test_events)
    np.testing.assert_allclose(probs, pl.read_parquet(tmp_path / PREDICTIONS_FILE)["prob"].to_numpy(),
                               rtol=0, atol=1e-5)


def test_ids_beat_no_content_on_cold_items(tmp_path, world_files):
    """The synthetic world's clicks depend on content; a cold item has only its IDs.
    Averaged over two seeds: one small run moves cold AUC by about 0.01. The codes
    alone (no prefix n-grams, which trade some cold AUC for overall AUC)."""
    gaps = []
    for seed in (0, 1):
        config = RankerConfig(epochs=3, patience=4, seed=seed, prefix_ngrams="none")
        results = {variant: run_train_job(_job(world_files, tmp_path / f"{variant}-{seed}",
                                               variant=variant, streaming=False, ranker=config),
                                          progress=False)
                   for variant in ("no_content", "ids")}
        gaps.append(results["ids"]["auc_cold"] - results["no_content"]["auc_cold"])
        assert results["ids"]["rows_cold"] == results["no_content"]["rows_cold"] > 500
    assert np.mean(gaps) > 0.02, gaps


def test_codes_missing_for_an_events_item_is_a_clear_error(tmp_path, world_files):
    codes = pl.read_parquet(world_files["codes"])
    short = tmp_path / "codes.parquet"
    codes.filter(pl.col("item_id") % 7 != 0).write_parquet(short)
    job = TrainJob(split_dir=str(world_files["root"] / "split"), out=str(tmp_path / "run"),
                   variant="ids", item_codes=str(short), quantizer=str(world_files["quantizer"]),
                   ranker=RankerConfig(epochs=1, table_warmup_epochs=0))
    with pytest.raises(DataContractError, match="item_id values have no item embedding/codes"):
        run_train_job(job, progress=False)


def _train_cli(config: Path, *extra: str, nproc: int = 1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "mmtok.cli", "train", "--config", str(config), "--quiet",
               "--no-track", *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "mmtok.cli", "train", "--config", str(config),
               "--quiet", "--no-track", *extra]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.mark.parametrize("streaming, tolerance", [(True, 0.01), (False, 0.001)])
def test_two_process_gloo_run_matches_one_process(tmp_path, world_files, streaming, tolerance):
    """torchrun, 2 ranks, tables sharded by TorchRec's planner. Streamed, each rank reads
    its own data streams; in memory, it takes its half of each global batch. Either way
    the two ranks train on one process' global batches, so the runs differ only by
    floating-point reduction order. Two epochs: the table warm-up and one in which the
    tables learn (reduction-order drift compounds with every epoch of training: after a
    third, the MLP weights of 1 and 2 processes were 3% apart, their AUCs 0.001)."""
    aucs = {}
    for nproc in (1, 2):
        config = tmp_path / f"job{nproc}.toml"
        # id_init_scale 1: the weight drift below is relative to the rows' size; rows that
        # start at a tenth of it (the default) read t_user_id's drift as 4.9%, not 1.5%.
        config.write_text(_job(world_files, tmp_path / f"run{nproc}", streaming=streaming,
                               ranker=RankerConfig(epochs=2, patience=1,
                                                   id_init_scale=1.0)).to_toml())
        proc = _train_cli(config, nproc=nproc)
        out, err = proc.communicate(timeout=240)
        if proc.returncode != 0 and nproc > 1:
            # torchrun --standalone picks a free loopback port by binding and releasing it;
            # another process can take it in between. One retry; a real failure fails twice.
            shutil.rmtree(tmp_path / f"run{nproc}", ignore_errors=True)
            proc = _train_cli(config, nproc=nproc)
            out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        metrics = json.loads((tmp_path / f"run{nproc}" / "metrics.json").read_text())
        assert metrics["world_size"] == nproc
        aucs[nproc] = metrics["auc"]
    assert abs(aucs[1] - aucs[2]) < tolerance, aucs
    # The 2-process run's tables, sharded over the ranks, are gathered into one servable
    # model, which scores the test events as the run's own offline predict did.
    predicted = pl.read_parquet(tmp_path / "run2" / PREDICTIONS_FILE)
    served = ServableModel.load(tmp_path / "run2" / "model")
    test_events = pl.read_parquet(world_files["root"] / "split" / "test.parquet")
    np.testing.assert_allclose(served.score_events(test_events), predicted["prob"].to_numpy(),
                               rtol=0, atol=1e-5)
    from safetensors.torch import load_file
    models = {n: load_file(tmp_path / f"run{n}" / "model" / "ranker.safetensors") for n in (1, 2)}
    assert models[1].keys() == models[2].keys()
    tables = [k for k in models[1] if "embedding_bags" in k]
    assert len(tables) >= 4 and all(models[1][k].shape == models[2][k].shape for k in models[1])
    if not streaming:  # the same batches: the same weights, up to reduction-order drift
        # Measured (mean relative difference, the largest tensor): 0.6% without the user x
        # content-ID cross, 1.5% with it (its per-user rows make training more sensitive);
        # AUCs 0.00006 and 0.00008 apart.
        for key, one in models[1].items():
            drift = (models[2][key] - one).abs().mean() / one.abs().mean().clamp_min(1e-12)
            assert drift < 0.03, (key, float(drift))


def test_sigkill_mid_epoch_then_resume_ends_where_an_uninterrupted_run_ends(tmp_path, world_files):
    ranker = RankerConfig(epochs=3, patience=3, batch_size=64)
    whole, killed = tmp_path / "whole.toml", tmp_path / "killed.toml"
    whole.write_text(_job(world_files, tmp_path / "whole", ranker=ranker).to_toml())
    killed.write_text(_job(world_files, tmp_path / "killed", ranker=ranker,
                           checkpoint_every=100).to_toml())
    _finish(_train_cli(whole))

    proc = _train_cli(killed)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not list(ckpts.glob("step-*/rank0.safetensors")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "metrics.json").exists()
    step = int(sorted(ckpts.glob("step-*"))[-1].name.split("-")[1])
    steps_per_epoch = world_files["split"].summary["train"]["rows"] // 64
    assert 0 < step < steps_per_epoch  # killed mid-epoch 1

    _finish(_train_cli(killed, "--resume"))
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    b = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert b["resumed"] is True
    assert abs(a["auc"] - b["auc"]) < 0.003, (a["auc"], b["auc"])


def test_checkpoints_refuse_corruption_and_never_start_over_silently(tmp_path, world_files):
    job = _job(world_files, tmp_path / "run", checkpoint_every=50,
               ranker=RankerConfig(epochs=1, table_warmup_epochs=0, batch_size=256))
    run_train_job(job, progress=False, stop_after_steps=60)
    (gen,) = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    tensors, state = load_checkpoint(gen / "rank0.safetensors")
    assert state["progress"]["global_step"] == 50 and state["world_size"] == 1

    # Without --resume an existing checkpoint is an error, not an overwrite.
    with pytest.raises(CheckpointError, match="pass --resume"):
        run_train_job(job, progress=False)
    # A flipped byte in the tensor data is caught by the checksum.
    path = gen / "rank0.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        run_train_job(job, progress=False, resume=True)
    # A truncated file is refused too.
    path.write_bytes(bytes(raw[:100]))
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        run_train_job(job, progress=False, resume=True)
    # --resume with nothing to resume from is an error.
    fresh = _job(world_files, tmp_path / "fresh")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        run_train_job(fresh, progress=False, resume=True)


def test_training_runs_side_by_side_give_the_runs_one_by_one(tmp_path, world_files):
    """launch_train_jobs with two workers (worker processes) yields the
    same metrics and test predictions, in the jobs' order, as the runs one by one here."""
    from mmtok.train_cmd import launch_train_jobs

    def jobs(where: str) -> list[TrainJob]:
        return [_job(world_files, tmp_path / where / f"{variant}-{seed}", variant=variant,
                     ranker=RankerConfig(epochs=2, patience=1, seed=seed))
                for variant, seed in (("ids", 0), ("no_content", 1), ("ids", 1))]

    alone = list(launch_train_jobs(jobs("alone"), workers=1, progress=False))
    side_by_side = list(launch_train_jobs(jobs("pool"), workers=2, progress=False))
    assert [m["auc"] for m in side_by_side] == [m["auc"] for m in alone]
    assert len({m["auc"] for m in alone}) == 3  # three different runs, in order
    for a, b in zip(jobs("alone"), jobs("pool")):
        assert pl.read_parquet(Path(a.out) / PREDICTIONS_FILE).equals(
            pl.read_parquet(Path(b.out) / PREDICTIONS_FILE))


def test_default_workers_share_the_cores_and_never_drop_to_zero(monkeypatch):
    from mmtok import train_cmd

    monkeypatch.setattr(train_cmd.os, "sched_getaffinity", lambda _: set(range(8)), raising=False)
    assert train_cmd.default_train_workers(1) == 8
    assert train_cmd.default_train_workers(2, nproc=2) == 2
    assert train_cmd.default_train_workers(16) == 1  # a run wider than the machine
    monkeypatch.delattr(train_cmd.os, "sched_getaffinity")  # as on macOS
    monkeypatch.setattr(train_cmd.os, "cpu_count", lambda: 4)
    assert train_cmd.default_train_workers(1) == 4


def test_quantizers_fit_side_by_side_as_one_by_one(tmp_path, world_files):
    """The bench's quantizer fits in worker processes (each on its share of the cores)
    write the same codes as the fits one by one here, and measure the same quality up
    to the rounding of the decoder's floats, which the thread count may move."""
    from mmdata import read_embeddings
    from mmtok.bench_ranking import fit_quantizers
    from quantizer import build_quantizers

    emb = read_embeddings(world_files["item_embeddings"])

    def fit(where: str, workers: int):
        return fit_quantizers(build_quantizers([16, 32], 1, seed=0, steps=10), emb,
                              world_files["split"].train, tmp_path / where, seed=0,
                              progress=False, log=lambda _: None, workers=workers)

    (alone, alone_codes, _), (pool, pool_codes, dirs) = fit("alone", 1), fit("pool", 2)
    assert list(pool_codes) == list(alone_codes) and len(alone_codes) >= 2
    for name in alone_codes:
        assert pl.read_parquet(pool_codes[name]).equals(pl.read_parquet(alone_codes[name]))
        assert pool[name]["rel_mse"] == pytest.approx(alone[name]["rel_mse"], rel=1e-6)
        assert (dirs[name] / "quantizer.json").exists()


def test_training_runs_side_by_side_report_a_failed_run(tmp_path, world_files):
    from mmtok.train_cmd import launch_train_jobs

    broken = replace(_job(world_files, tmp_path / "broken"), split_dir=str(tmp_path / "no-split"))
    with pytest.raises(FileNotFoundError, match="no-split"):
        list(launch_train_jobs([broken, broken], workers=2, progress=False))


def test_bench_ranking_writes_the_report_a_colleague_reads(tmp_path, world_files):
    from mmtok.cli import main

    out = tmp_path / "bench"
    assert main(["bench-ranking", "--events", str(world_files["events"]),
                 "--item-embeddings", str(world_files["item_embeddings"]), "--out", str(out),
                 "--variants", "no_content,dense,recon,ids,task_ids,faiss_rq_ids",
                 "--baselines", "faiss_rq",
                 "--epochs", "2", "--quantizer-steps", "20", "--seeds", "0,1",
                 "--scale-sizes", "16,64", "--levels", "3", "--jobs", "2", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_workers"] == 2
    assert set(metrics["variants"]) == {"no_content", "dense", "recon", "ids", "task_ids",
                                        "faiss_rq_ids"}
    for m in metrics["variants"].values():
        assert {"auc", "auc_warm", "auc_cold", "logloss", "ne", "train_examples_per_s"} <= set(m)
        assert 0.5 < m["auc"] < 1 and m["train_examples_per_s"] > 0
        assert len(m["auc_seeds"]) == 2 and m["auc"] == pytest.approx(np.mean(m["auc_seeds"]))
    loss = metrics["quantization_loss"]
    dense = metrics["variants"]["dense"]["auc"]
    assert loss["lift_lost"] == pytest.approx((dense - metrics["variants"]["ids"]["auc"]) / (dense - 0.5))
    assert set(loss) == {"lift_lost", "lift_lost_cold", "lift_lost_recon", "content_lift_lost",
                         "content_lift_lost_cold", "content_lift_lost_recon",
                         "content_lift_lost_faiss_rq_ids", "content_lift_lost_task_ids"}
    # Paired intervals from the seeds' test predictions, each around its own point value.
    intervals = metrics["intervals"]
    assert set(intervals) == {"lift_lost", "lift_lost_cold", "lift_lost_recon",
                              "content_lift_lost", "content_lift_lost_cold",
                              "content_lift_lost_recon", "dense_vs_no_content",
                              "ids_vs_no_content_cold",  # ids_dense did not run
                              "ids_vs_faiss_rq_ids",  # mmtok's IDs against the baseline's
                              "content_lift_lost_faiss_rq_ids", "content_lift_lost_task_ids",
                              "task_ids_vs_ids", "task_ids_vs_ids_cold"}
    assert intervals["lift_lost"]["value"] == pytest.approx(loss["lift_lost"])
    for entry in intervals.values():
        assert entry["low"] < entry["value"] < entry["high"] and 0 <= entry["p_favourable"] <= 1
    predicted = pl.read_parquet(out / "variants" / "ids" / "seed-1" / "test_predictions.parquet")
    assert predicted.height == metrics["dataset"]["split"]["test"]["rows"]
    assert predicted.columns == ["user_id", "item_id", "label", "is_cold", "prob"]
    assert set(metrics["quantizers"]) == {"mmtok", "faiss_rq", "task_mmtok"}
    # Task-aware tokens: aligned on the training events, at a reported cost, and served by
    # their own bundle, which tokenizes a new ad with the task-aware encoder.
    task = metrics["quantizers"]["task_mmtok"]
    assert task["training"]["task_alignment"]["signal"] == "clicks"
    assert task["fit_s"] > 0 and task["encode_items_per_s"] > 0
    from ranker.bundle import ServableModel
    served = ServableModel.load(out / metrics["models"]["task_ids"])
    task_codes = pl.read_parquet(out / "codes" / "task_mmtok.parquet")
    names = served.quantizer.code_names  # "tuples moved" counts the items whose IDs differ
    content_codes = pl.read_parquet(out / "codes" / "mmtok.parquet").sort("item_id")
    differ = (content_codes.select(names).to_numpy()
              != task_codes.sort("item_id").select(names).to_numpy()).any(1)
    assert task["tuples_differ_from_content"] == pytest.approx(differ.mean())
    vectors = pl.read_parquet(world_files["item_embeddings"]).sort("item_id")
    first = np.stack(vectors["embedding"].to_list()[:8]).astype(np.float32)
    expected = task_codes.sort("item_id").select(served.quantizer.code_names).to_numpy()[:8]
    assert (served.tokenize(first) == expected).all()
    assert metrics["quantizer"]["codebook_sizes"] == [16, 16, 16, 64, 64, 64]
    # The quantizers never saw the held-out cold items: their codes are out of sample.
    n_items = metrics["quantizer"]["fit_items"] + metrics["quantizer"]["measured_items"]
    assert metrics["quantizer"]["measured_on"] == "items without training events"
    assert metrics["quantizer"]["measured_items"] >= metrics["dataset"]["split"]["holdout_items"]
    assert n_items == pl.read_parquet(world_files["item_embeddings"]).height
    # The synthetic world knows its clicks' true logit: the oracle bounds every variant.
    oracle = metrics["oracle"]
    assert all(m["auc"] < oracle["auc"] for m in metrics["variants"].values())
    assert oracle["gap_closed"]["no_content"] == 0 and "The oracle" in (out / "report.md").read_text()
    # A finished run's checkpoints (for --resume only) are gone; its model stays.
    assert not list(out.glob("variants/**/checkpoints"))
    assert len(list(out.glob("variants/*/seed-*/model/bundle.json"))) == 12
    report = (out / "report.md").read_text()
    assert "| faiss_rq_ids |" in report and "lift_lost_recon" in report and " ± " in report
    assert "## Task-aware tokens" in report and "| task-aware (`task_ids`) |" in report
    assert "## How sure the test set and the seeds make these" in report
    assert "95% interval over the test rows and 2 seeds" in report
    assert "Every seed's gap" in report and " / " in report  # per-seed AUCs
    # The summary's first line says whether content's lift can be measured here.
    summary = report.split("## Summary")[1].split("\n- ")[1]
    assert summary.startswith(("**Content's lift cannot be measured", "Content adds"))
    assert "comparisons.png" in report and (out / "comparisons.png").stat().st_size > 10_000
    assert "tables updated by row-wise Adagrad" in report  # the ranker config is named
    # Throughput: ids against no_content in interleaved windows, round by round.
    throughput = metrics["throughput"]
    assert set(throughput["rates"]) == {"no_content", "ids"}
    assert all(len(r) == throughput["rounds"] and min(r) > 0 for r in throughput["rates"].values())
    ratios = [a / b for a, b in zip(throughput["rates"]["ids"], throughput["rates"]["no_content"])]
    assert throughput["ratio"]["ids"] == pytest.approx(float(np.median(ratios)))
    assert throughput["ratio"]["no_content"] == 1.0
    assert f"Training throughput of `ids` is **{throughput['ratio']['ids']:.2f}x**" in report
    assert (out / "variant_auc.png").stat().st_size > 10_000
    # The split follows the protocol and the codes follow the contract.
    assert metrics["dataset"]["split"]["test"]["cold_rows"] > 0
    codes = pl.read_parquet(out / "codes" / "mmtok.parquet")
    assert codes.columns[0] == "item_id" and len(codes.columns) == 7


def test_bench_ranking_bad_inputs_are_clear_errors(tmp_path, world_files, capsys):
    from mmtok.cli import main

    events = pl.read_parquet(world_files["events"]).drop("label")
    events.write_parquet(tmp_path / "no_label.parquet")
    assert main(["bench-ranking", "--events", str(tmp_path / "no_label.parquet"),
                 "--item-embeddings", str(world_files["item_embeddings"]),
                 "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "label" in capsys.readouterr().err
    assert main(["bench-ranking", "--events", str(world_files["events"]),
                 "--item-embeddings", str(world_files["item_embeddings"]),
                 "--out", str(tmp_path / "b2"), "--variants", "idz", "--quiet"]) == 2
    assert "unknown variants ['idz']" in capsys.readouterr().err
    assert main(["bench-ranking", "--events", str(world_files["events"]),
                 "--item-embeddings", str(world_files["item_embeddings"]),
                 "--out", str(tmp_path / "b3"), "--levels", "0", "--quiet"]) == 2
    assert "levels >= 1" in capsys.readouterr().err


def test_seed_means_keep_a_metric_some_seeds_leave_empty_per_seed():
    """bench-ranking's mean over seeds: a metric only some runs have (the epoch the tables
    restarted from, None where patience never ran out) stays a per-seed list."""
    from mmtok.bench_ranking import _mean_over_seeds

    runs = [{"auc": 0.70, "auc_cold": 0.60, "tables_restarted_from_epoch": 4},
            {"auc": 0.72, "auc_cold": 0.62, "tables_restarted_from_epoch": None},
            {"auc": 0.74, "auc_cold": 0.64, "tables_restarted_from_epoch": 5}]
    mean = _mean_over_seeds(runs)
    assert mean["auc"] == pytest.approx(0.72) and mean["auc_seeds"] == [0.70, 0.72, 0.74]
    assert mean["tables_restarted_from_epoch"] == [4, None, 5]
    both = _mean_over_seeds([{**runs[0], "tables_restarted_from_epoch": 3}, runs[0]])
    assert both["tables_restarted_from_epoch"] == 3.5


def test_throughput_windows_take_turns_in_both_orders(monkeypatch):
    """The interleaved throughput stage runs each job first in half of the measured rounds,
    so rates that climb round after round favour neither, and reports one rate per round."""
    import types

    import ranker.job as job_module

    order: list[str] = []

    def fake_batches(name):
        while True:
            yield (None, None, [0] * 8, name)

    monkeypatch.setattr(job_module, "job_inputs", lambda job: (None, None, job.name))
    monkeypatch.setattr(job_module, "endless_batches",
                        lambda source, item_id_dropout: fake_batches(source))
    monkeypatch.setattr(job_module, "build_model", lambda features, ranker: (None, None, None))
    monkeypatch.setattr(job_module, "train_step",
                        lambda model, sparse_opt, dense_opt, batch: order.append(batch[3]))
    ranker_config = types.SimpleNamespace(num_threads=1, item_id_dropout=0.0)
    jobs = {name: types.SimpleNamespace(name=name, ranker=ranker_config)
            for name in ("no_content", "ids")}
    rounds, steps = 4, 3
    result = job_module.interleaved_train_rates(jobs, steps=steps, rounds=rounds)
    windows = [order[i] for i in range(0, len(order), steps)]  # one name per window
    measured = [windows[i:i + 2] for i in range(2, len(windows), 2)]  # after the warm-up
    assert len(measured) == rounds
    firsts = [pair[0] for pair in measured]
    assert firsts.count("no_content") == firsts.count("ids") == rounds // 2
    assert all(sorted(pair) == ["ids", "no_content"] for pair in measured)
    assert all(len(r) == rounds for r in result["rates"].values())
    assert result["ratio"]["no_content"] == 1.0
