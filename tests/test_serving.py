"""The gRPC ranking server end to end, on free loopback ports, with a tiny model trained
here on a small synthetic world whose last 10% of items are brand-new ads (no row in
the model's content table, no training event)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import polars as pl
import pytest
from conftest import ServeProcess
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mmdata import SyntheticWorldConfig, generate_world, split_events
from mmtok.cli import main
from mmtok.serving import (InvalidRequest, MicroBatcher, ModelSlot, RankingServer, RequestLimits,
                           ServerConfig, score_jobs, validate_score_request,
                           validate_tokenize_request)
from mmtok.serving.batcher import DeadlineExceeded
from mmtok.serving.requests import ScoreJob
from proto.mmtok.v1 import Candidate, RankingServiceStub, ScoreRequest, TokenizeRequest
from quantizer import ResidualKMeansConfig, ResidualKMeansQuantizer
from ranker import (FeatureEncoder, ItemContent, RankerConfig, RankingModel, predict,
                    train_ranker)
from ranker.bundle import NEW_ITEM, BundleError, ServableModel

ROOT = Path(__file__).resolve().parents[1]
N_ITEMS, N_KNOWN = 1000, 900
CONFIG = RankerConfig(embedding_dim=8, dense_arch=[16, 8], over_arch=[16, 1], epochs=1,
                      table_warmup_epochs=0, batch_size=256)


@pytest.fixture(scope="module")
def world():
    w = generate_world(SyntheticWorldConfig(n_items=N_ITEMS, n_users=300, n_events=8_000, dim=16,
                                            n_clusters=6, subclusters_per_cluster=3, seed=3),
                       progress=False)
    # a dense context feature, so standardization is on the serving path too
    events = w.events.with_columns(((pl.col("ts") // 3600) % 24).cast(pl.Float32)
                                   .alias("dense_hour"))
    split = split_events(events.filter(pl.col("item_id") < N_KNOWN), seed=0)
    x = w.embeddings.vectors
    q = ResidualKMeansQuantizer(ResidualKMeansConfig(scale_sizes=[4, 8, 16], seed=0))
    q.fit(x[:N_KNOWN])
    codes = q.encode(x)  # (N_ITEMS, 6): the new ads' codes are what the server must compute
    return {"split": split, "x": x, "q": q, "codes": codes, "items": w.embeddings.item_ids}


def content_of(world, n_items):
    return ItemContent(world["items"][:n_items], codes=world["codes"][:n_items],
                       code_names=world["q"].code_names,
                       codebook_sizes=world["q"].codebook_sizes)


@pytest.fixture(scope="module")
def served(world, tmp_path_factory):
    """The trained ids model, its offline encoder over all items, and its bundle dir."""
    split = world["split"]
    features = FeatureEncoder(split.train, content_of(world, N_KNOWN), use_codes=True,
                              use_dense_content=False)
    trained = train_ranker(features, features.encode(split.train), features.encode(split.valid),
                           CONFIG, progress=False)
    directory = tmp_path_factory.mktemp("model") / "v1"
    ServableModel(trained.model, features, CONFIG, quantizer=world["q"]).save(directory, name="v1")
    # Offline, a brand-new ad is just an item of the content table the model never saw.
    offline = FeatureEncoder(split.train, content_of(world, N_ITEMS), use_codes=True,
                             use_dense_content=False)
    return {"model": trained.model, "offline": offline, "dir": directory}


@pytest.fixture(scope="module")
def server(served):
    srv = RankingServer(str(served["dir"]), ServerConfig(port=0, max_candidates=300,
                                                          max_message_bytes=64 * 1024))
    port = srv.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield srv, channel, RankingServiceStub(channel)
    channel.close()
    srv.stop(grace_s=1)


def score_request(world, user_id, item_ids, *, device=1, position=0, hour=13.0,
                  with_embedding=None):
    """A Score request; new ads (and items in with_embedding) carry their embedding."""
    cands = []
    for i in item_ids:
        send = i >= N_KNOWN or (with_embedding is not None and i in with_embedding)
        cands.append(Candidate(item_id=int(i),
                               embedding=world["x"][i].tolist() if send else []))
    return ScoreRequest(user_id=user_id, context={"cat_position": position, "cat_device": device},
                        dense={"dense_hour": hour}, candidates=cands)


def offline_scores(served, user_id, item_ids, *, device=1, position=0, hour=13.0):
    n = len(item_ids)
    events = pl.DataFrame({"user_id": [user_id] * n, "item_id": list(item_ids),
                           "cat_position": [position] * n, "cat_device": [device] * n,
                           "dense_hour": [hour] * n, "label": [0] * n},
                          schema_overrides={"dense_hour": pl.Float32})
    features = served["offline"]
    return predict(served["model"], features, features.encode(events))


def mixed_items(rng, n=200):
    """80% items the model knows, 20% brand-new ads."""
    return np.concatenate([rng.choice(N_KNOWN, size=n - n // 5, replace=False),
                           rng.choice(np.arange(N_KNOWN, N_ITEMS), size=n // 5, replace=False)])


# ------------------------------------------------------------------------ contract


def test_committed_stubs_are_current(tmp_path):
    from grpc_tools import protoc

    args = ["protoc", f"-I{ROOT}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", str(ROOT / "proto/mmtok/v1/ranking.proto")]
    assert protoc.main(args) == 0
    for name in ("ranking_pb2.py", "ranking_pb2.pyi", "ranking_pb2_grpc.py"):
        fresh = (tmp_path / "proto/mmtok/v1" / name).read_text()
        assert (ROOT / "proto/mmtok/v1" / name).read_text() == fresh, \
            f"proto/mmtok/v1/{name} is stale: run `make proto`"


# ------------------------------------------------------------------------ round trip


def test_round_trip_health_and_reflection(world, server):
    srv, channel, stub = server
    items = mixed_items(np.random.default_rng(0))
    reply = stub.Score(score_request(world, 5, items), timeout=10)
    assert reply.model_version.startswith("v1-") and len(reply.scores) == len(items)
    assert all(0.0 < s < 1.0 for s in reply.scores)
    assert list(reply.tokenized) == (items >= N_KNOWN).tolist()

    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "mmtok.v1.RankingService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING

    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(reflect.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="mmtok.v1.ScoreRequest"),
    ]), timeout=5))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"mmtok.v1.RankingService", "grpc.health.v1.Health"} <= names
    assert answers[1].file_descriptor_response.file_descriptor_proto


def test_scores_equal_offline_predict(world, served, server):
    """Known, cold-in-table and brand-new items, alone and micro-batched with others."""
    _, _, stub = server
    rng = np.random.default_rng(1)
    cases = [(int(u), mixed_items(rng, n), int(d), float(h))
             for u, n, d, h in [(3, 200, 0, 7.0), (10**12, 50, 1, 23.0), (77, 1, 2, 0.5)]]
    replies = [stub.Score.future(score_request(world, u, items, device=d, hour=h), timeout=20)
               for u, items, d, h in cases]  # concurrent: may share a forward pass
    for (u, items, d, h), reply in zip(cases, replies):
        expected = offline_scores(served, u, items, device=d, hour=h)
        np.testing.assert_allclose(reply.result().scores, expected, atol=1e-5, rtol=0)


def test_tokenize_gives_the_quantizer_codes(world, server):
    _, _, stub = server
    ids = [3, 950, 999]
    reply = stub.Tokenize(TokenizeRequest(items=[Candidate(item_id=i, embedding=world["x"][i].tolist())
                                                 for i in ids]), timeout=5)
    assert list(reply.code_names) == world["q"].code_names
    assert [it.item_id for it in reply.items] == ids
    assert [list(it.codes) for it in reply.items] == world["codes"][ids].tolist()


# ------------------------------------------------------------------------ bad input


def _bad_requests(world):
    good = score_request(world, 5, [1, 2, 950])
    wide = ScoreRequest(); wide.CopyFrom(good); wide.candidates[2].embedding.append(0.5)
    nan = ScoreRequest(); nan.CopyFrom(good); nan.candidates[2].embedding[3] = float("nan")
    inf = ScoreRequest(); inf.CopyFrom(good); inf.candidates[2].embedding[0] = float("inf")
    known_bad = score_request(world, 5, [1, 2], with_embedding={2})
    known_bad.candidates[1].embedding.append(1.0)
    no_emb = ScoreRequest(); no_emb.CopyFrom(good); del no_emb.candidates[2].embedding[:]
    empty = ScoreRequest(); empty.CopyFrom(good); del empty.candidates[:]
    missing_ctx = ScoreRequest(); missing_ctx.CopyFrom(good); del missing_ctx.context["cat_device"]
    extra_ctx = ScoreRequest(); extra_ctx.CopyFrom(good); extra_ctx.context["cat_devise"] = 1
    dense_nan = ScoreRequest(); dense_nan.CopyFrom(good); dense_nan.dense["dense_hour"] = float("nan")
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return [
        ("wrong width", wide, invalid, "candidates[2].embedding: width 17"),
        ("wrong width on a known item", known_bad, invalid, "candidates[1].embedding: width 17"),
        ("NaN", nan, invalid, "candidates[2].embedding: NaN or Inf"),
        ("Inf", inf, invalid, "candidates[2].embedding: NaN or Inf"),
        ("unknown item without embedding", no_emb, invalid, "candidates[2].embedding: missing"),
        ("empty candidates", empty, invalid, "candidates: empty"),
        ("too many candidates", score_request(world, 5, list(range(301))), invalid,
         "candidates: 301 entries"),
        ("oversize message", score_request(world, 5, list(range(N_KNOWN, N_KNOWN + 100)) * 12),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
        ("missing context", missing_ctx, invalid, "context: missing ['cat_device']"),
        ("unknown context", extra_ctx, invalid, "context: unknown keys ['cat_devise']"),
        ("NaN dense context", dense_nan, invalid, "dense['dense_hour']"),
    ]


def test_bad_input_gets_its_code_and_the_server_keeps_serving(world, served, server):
    _, _, stub = server
    good_items = [1, 2, 950]
    expected = offline_scores(served, 5, good_items)
    for name, request, code, message in _bad_requests(world):
        with pytest.raises(grpc.RpcError) as info:
            stub.Score(request, timeout=10)
        assert info.value.code() == code, name
        assert message in info.value.details(), (name, info.value.details())
        reply = stub.Score(score_request(world, 5, good_items), timeout=10)
        np.testing.assert_allclose(reply.scores, expected, atol=1e-5, rtol=0, err_msg=name)
    with pytest.raises(grpc.RpcError) as info:
        stub.Tokenize(TokenizeRequest(items=[Candidate(item_id=1)]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[0].embedding: missing" in info.value.details()


def test_deadlines(world, server):
    _, _, stub = server
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(score_request(world, 5, mixed_items(np.random.default_rng(2))), timeout=1e-4)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the batcher drops a job whose deadline passed while it waited, and keeps scoring
    model = ServableModel.load(server[0].slot.source)
    events = pl.DataFrame({"user_id": [1], "item_id": [1], "cat_position": [0], "cat_device": [0],
                           "dense_hour": [1.0]}, schema_overrides={"dense_hour": pl.Float32})
    job = lambda deadline: ScoreJob(model, events, model.content_rows(np.array([1])),  # noqa: E731
                                    np.zeros((0, 16), np.float32), deadline)
    batcher = MicroBatcher(max_rows=64, max_queue=4)
    late = batcher.submit(job(time.monotonic() - 1))
    on_time = batcher.submit(job(time.monotonic() + 30))
    with pytest.raises(DeadlineExceeded):
        late.result(timeout=10)
    assert on_time.result(timeout=10).shape == (1,)
    batcher.close()


# ------------------------------------------------------------------------ reload, shutdown


def _publish(link: Path, target: Path) -> None:
    """Atomically repoints a model symlink (how a new version should be published)."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def test_reload_under_traffic(world, served, tmp_path):
    v1 = ServableModel.load(served["dir"])
    v2 = ServableModel.load(served["dir"])
    with torch.no_grad():
        for p in v2.model.net.over_arch.parameters():
            p.add_(0.05)
    v2.save(tmp_path / "v2", name="v2")
    link = tmp_path / "current"
    _publish(link, served["dir"])
    srv = RankingServer(str(link), ServerConfig(port=0, watch_s=0.05))
    port = srv.start()
    items = mixed_items(np.random.default_rng(3), 100)
    request = score_request(world, 9, items)
    offline = {m.model_version: m for m in (v1, v2)}
    errors, seen, stop = [], [], threading.Event()

    def client(k: int):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = RankingServiceStub(channel)
            for _ in range(2000):  # bounded; the test stops it much earlier
                if stop.is_set():
                    return
                try:
                    reply = stub.Score(request, timeout=10)
                    seen.append((reply.model_version, np.array(reply.scores), k))
                except grpc.RpcError as exc:
                    errors.append(exc.code())

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while len(seen) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        _publish(link, tmp_path / "v2")
        while srv.slot.current.model_version != v2.model_version and time.monotonic() < deadline:
            time.sleep(0.01)
        n_before = len(seen)
        while len(seen) < n_before + 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        # a torn copy is refused and the good version keeps serving
        broken = tmp_path / "v3"
        ServableModel.load(served["dir"]).save(broken, name="v3")
        with open(broken / "ranker.safetensors", "r+b") as fh:
            fh.seek(-4, 2)
            fh.write(b"\0\0\0\0")
        _publish(link, broken)
        assert srv.slot.reload() is False and srv.slot.failed_reloads >= 1
        assert srv.slot.current.model_version == v2.model_version
    finally:
        stop.set()
        for t in threads:
            t.join()
        srv.stop(grace_s=1)
    assert errors == []
    versions = [v for v, _, _ in seen]
    assert versions[0] == v1.model_version and set(versions) == {v1.model_version, v2.model_version}
    # No flapping back: each client's calls are sequential, so once one of them is answered
    # by v2 none of its later calls may be answered by v1. (Across clients the order of
    # appends is not the order of serving: a call served by v1 can return after another
    # client's v2 answer.)
    for k in range(3):
        own = [v for v, _, client_k in seen if client_k == k]
        if v2.model_version in own:
            assert set(own[own.index(v2.model_version):]) == {v2.model_version}, k
    for version, scores, _ in seen[:: max(1, len(seen) // 10)] + seen[-1:]:
        m = offline[version]
        expected = m.score_events(request_events(items), world["x"][items[items >= N_KNOWN]])
        np.testing.assert_allclose(scores, expected, atol=1e-5, rtol=0)
    with pytest.raises(BundleError, match="sha256"):
        ServableModel.load(broken)


def request_events(items, user_id=9):
    n = len(items)
    return pl.DataFrame({"user_id": [user_id] * n, "item_id": items.tolist(),
                         "cat_position": [0] * n, "cat_device": [1] * n, "dense_hour": [13.0] * n},
                        schema_overrides={"dense_hour": pl.Float32})


def test_graceful_stop_finishes_in_flight_calls(world, served):
    srv = RankingServer(str(served["dir"]), ServerConfig(port=0))
    port = srv.start()
    model = srv.slot.current
    entered, release = threading.Event(), threading.Event()
    real = model.score_candidates

    def slow_score(*args):
        entered.set()
        assert release.wait(30)
        return real(*args)

    model.score_candidates = slow_score
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = RankingServiceStub(channel)
        in_flight = stub.Score.future(score_request(world, 5, [1, 950]), timeout=60)
        assert entered.wait(30)
        stopper = threading.Thread(target=srv.stop, kwargs={"grace_s": 30})
        stopper.start()
        refused = None
        for _ in range(200):  # new calls are refused while the old one runs
            try:
                stub.Score(score_request(world, 5, [1]), timeout=0.2)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    refused = exc
                    break
        release.set()
        assert len(in_flight.result().scores) == 2
        stopper.join(30)
    assert refused is not None and not stopper.is_alive()


def test_bundle_round_trip_with_dense_content(world, tmp_path):
    """The ids_dense layout: codes and the raw embedding; brand-new ads use their own."""
    split = world["split"]
    known = ItemContent(world["items"][:N_KNOWN], vectors=world["x"][:N_KNOWN],
                        codes=world["codes"][:N_KNOWN], code_names=world["q"].code_names,
                        codebook_sizes=world["q"].codebook_sizes)
    features = FeatureEncoder(split.train, known, use_codes=True, use_dense_content=True)
    torch.manual_seed(0)
    model = RankingModel.of(features, CONFIG)
    ServableModel(model, features, CONFIG, quantizer=world["q"],
                  content_vectors="embedding").save(tmp_path / "m")
    loaded = ServableModel.load(tmp_path / "m")
    items = mixed_items(np.random.default_rng(4), 60)
    full = ItemContent(world["items"], vectors=world["x"], codes=world["codes"],
                       code_names=world["q"].code_names, codebook_sizes=world["q"].codebook_sizes)
    offline = FeatureEncoder(split.train, full, use_codes=True, use_dense_content=True)
    events = request_events(items).with_columns(pl.lit(0).alias("label"))
    expected = predict(model, offline, offline.encode(events))
    got = loaded.score_events(request_events(items), world["x"][items[items >= N_KNOWN]])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    with pytest.raises(BundleError, match="no bundle.json"):
        ServableModel.load(tmp_path)
    # A bundle of format version 1 (one table per content ID) is refused, saying so.
    manifest = json.loads((tmp_path / "m" / "bundle.json").read_text())
    (tmp_path / "m" / "bundle.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(BundleError, match="version 1, expected .* version 2 .* train it again"):
        ServableModel.load(tmp_path / "m")


def test_a_dense_only_model_scores_a_new_ad_from_its_embedding_without_a_quantizer(world,
                                                                                 tmp_path):
    """The dense variant reads only the embedding: no quantizer is saved or needed, its
    embedding width comes from the content vectors, and a brand-new ad is scored from
    the embedding it brings, through the request boundary as offline."""
    split = world["split"]
    known = ItemContent(world["items"][:N_KNOWN], vectors=world["x"][:N_KNOWN])
    features = FeatureEncoder(split.train, known, use_codes=False, use_dense_content=True)
    torch.manual_seed(0)
    model = RankingModel.of(features, CONFIG)
    with pytest.raises(ValueError, match="needs the quantizer"):
        ServableModel(model, features, CONFIG, content_vectors="recon")
    ServableModel(model, features, CONFIG, content_vectors="embedding").save(tmp_path / "m")
    assert not (tmp_path / "m" / "quantizer").exists()
    loaded = ServableModel.load(tmp_path / "m")
    assert loaded.quantizer is None and loaded.embedding_dim == 16 and loaded.needs_content

    offline = FeatureEncoder(split.train, ItemContent(world["items"], vectors=world["x"]),
                             use_codes=False, use_dense_content=True)
    items = np.array([3, 950, 17, 999])
    expected = predict(model, offline, offline.encode(
        request_events(items).with_columns(pl.lit(0).alias("label"))))
    new = world["x"][[950, 999]]
    np.testing.assert_allclose(loaded.score_events(request_events(items), new), expected,
                               atol=1e-5, rtol=0)
    request = score_request(world, 9, items)
    job = validate_score_request(request, loaded, RequestLimits())
    assert job.content_row.tolist() == [3, NEW_ITEM, 17, NEW_ITEM]
    assert job.tokenized.tolist() == [False, True, False, True]
    np.testing.assert_array_equal(job.new_embeddings, new)
    np.testing.assert_allclose(score_jobs([job, job])[1], expected, atol=1e-5, rtol=0)
    request.candidates[1].embedding.append(0.5)
    with pytest.raises(InvalidRequest, match=r"candidates\[1\].embedding: width 17, .* 16 wide"):
        validate_score_request(request, loaded, RequestLimits())
    with pytest.raises(InvalidRequest, match="has no quantizer") as info:
        validate_tokenize_request(TokenizeRequest(items=request.candidates[:1]), loaded,
                                  RequestLimits())
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_a_model_from_mlflow_leaves_no_temporary_folder(served, tmp_path, monkeypatch):
    """The download's whole temporary folder goes once the model is loaded, or if the
    download fails."""
    import mlflow.artifacts

    def download(*, artifact_uri, dst_path):
        assert artifact_uri == "runs:/abc/model"
        return str(shutil.copytree(served["dir"], Path(dst_path) / "model"))

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download)
    slot = ModelSlot("runs:/abc/model")
    assert slot.current.model_version.startswith("v1-")
    assert list(tmp_path.iterdir()) == []

    def broken(**_):
        raise OSError("connection reset")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", broken)
    assert slot.reload() is False and slot.failed_reloads == 1
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ CLI


def test_serve_and_score_commands(world, served, tmp_path, capsys):
    """`mmtok serve` in its own process: score from JSON, health, SIGTERM exits 0."""
    request = score_request(world, 5, [1, 2, 950])
    from google.protobuf import json_format

    (tmp_path / "request.json").write_text(json_format.MessageToJson(request))
    with ServeProcess(str(served["dir"]), cwd=ROOT) as server:
        addr = server.addr
        assert main(["score", "--addr", addr, "--health"]) == 0
        assert main(["score", "--addr", addr, "--request", str(tmp_path / "request.json")]) == 0
        out = capsys.readouterr().out
        assert "SERVING" in out and "model_version v1-" in out and "950\t" in out
        assert "tokenized" in out.splitlines()[-1]
        assert main(["score", "--addr", addr, "--request", str(tmp_path / "request.json"),
                     "--tokenize"]) == 0
        codes = capsys.readouterr().out.splitlines()
        assert codes[1].split("\t") == ["item_id", *world["q"].code_names]
        assert codes[2].split("\t") == [str(v) for v in [950, *world["codes"][950]]]
        assert main(["score", "--addr", addr, "--request", str(tmp_path / "request.json"),
                     "--tokenize", "--json"]) == 0
        reply = json.loads(capsys.readouterr().out)  # int64 as JSON numbers, not strings
        assert reply["items"] == [{"item_id": 950, "codes": world["codes"][950].tolist()}]
        bad = tmp_path / "bad.json"
        bad.write_text('{"user_id": 5, "candidates": []}')
        assert main(["score", "--addr", addr, "--request", str(bad)]) == 2
        assert "INVALID_ARGUMENT" in capsys.readouterr().err
        assert server.stop() == 0
