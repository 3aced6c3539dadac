import json

import numpy as np
import polars as pl
import pytest
from conftest import ServeProcess

from mmtok.cli import main


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "2", "--seeds", "2", "--quantizer",
                 "mmdict", "--quantizer-steps", "60", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["variants"]) == {"no_content", "dense", "recon", "ids", "ids_dense",
                                        "task_ids"}
    for m in metrics["variants"].values():
        assert 0.6 < m["auc"] < 0.8 and m["rows_cold"] > 500
    assert set(metrics["quantization_loss"]) == {
        "lift_lost", "lift_lost_cold", "lift_lost_recon", "content_lift_lost",
        "content_lift_lost_cold", "content_lift_lost_recon", "content_lift_lost_task_ids"}
    # task-aware tokens: fitted with the training events, compared with content-only IDs
    assert {"task_ids_vs_ids", "task_ids_vs_ids_cold"} <= set(metrics["intervals"])
    assert metrics["quantizers"]["task_mmtok"]["training"]["task_alignment"]["signal"] == "clicks"
    assert all(len(m["auc_seeds"]) == 2 for m in metrics["variants"].values())
    recon = metrics["intervals"]["lift_lost_recon"]
    assert recon["value"] == pytest.approx(metrics["quantization_loss"]["lift_lost_recon"])
    assert recon["low"] < recon["value"] < recon["high"]
    report = (out / "report.md").read_text()
    assert "| ids |" in report and "variant_auc.png" in report
    assert (out / "variant_auc.png").stat().st_size > 10_000
    codes = pl.read_parquet(out / "codes" / "mmtok.parquet")
    assert codes.height == 1682 and "code_l_1" in codes.columns
    assert metrics["quantizer"]["kind"] == "mmdict"
    assert (out / "quantizers" / "mmtok" / "weights.safetensors").exists()
    # the MLflow store holds the parent run and one nested run per variant
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["mmtok-demo"])
    assert len(runs) == 1 + 6 * 2  # the parent, and a run per variant and seed
    parent = runs[runs["run_id"] == metrics["mlflow_run_id"]].iloc[0]
    assert parent["metrics.lift_lost"] == pytest.approx(metrics["quantization_loss"]["lift_lost"])
    # Every variant left a servable model; the ids one is also at out/model, and is its
    # MLflow run's model.
    from mmtok.serving import ModelSlot
    from ranker.bundle import ServableModel

    assert sorted(metrics["models"]) == sorted(metrics["variants"])
    for name, directory in metrics["models"].items():
        # task_ids is an ids model whose bundle carries the task-aware tokenizer
        served = ServableModel.load(out / directory)
        assert served.model_version.startswith("ids-" if name == "task_ids" else f"{name}-")
        if name == "task_ids":
            assert served.quantizer.config.task_signal == "clicks"
    served = ServableModel.load(out / "model")
    assert served.model_version.startswith("ids-") and served.quantizer.kind == "mmdict"
    slot = ModelSlot(f"runs:/{metrics['variants']['ids']['mlflow_run_id']}/model")
    assert slot.current.model_version == served.model_version
    # The demo's ids job, retrained from the job file it left.
    assert main(["train", "--config", str(out / "job.toml"), "--out", str(tmp_path / "again"),
                 "--no-track", "--quiet"]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["auc"] == pytest.approx(metrics["variants"]["ids"]["auc"], abs=0.02)
    assert ServableModel.load(tmp_path / "again" / "model").quantizer.kind == "mmdict"


def test_each_job_logs_to_its_own_run_directory_unless_the_user_names_a_store(tmp_path,
                                                                             monkeypatch):
    from mmtok.tracking import start_tracking

    def log_one(out, experiment):
        mlflow = start_tracking(out, experiment)
        with mlflow.start_run(run_name="job"):
            mlflow.log_metric("auc", 0.7)
        return mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    log_one(a, "exp-a")
    mlflow = log_one(b, "exp-b")  # MLflow exported a's store as $MLFLOW_TRACKING_URI
    for out, experiment in ((a, "exp-a"), (b, "exp-b")):
        mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
        assert len(mlflow.search_runs(experiment_names=[experiment])) == 1
    # A store the user names in the environment takes every job's runs.
    shared = tmp_path / "shared.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{shared}")
    log_one(a, "exp-c")
    log_one(b, "exp-c")
    mlflow.set_tracking_uri(f"sqlite:///{shared}")
    assert len(mlflow.search_runs(experiment_names=["exp-c"])) == 2


def test_data_featurize_quantize_commands(tmp_path, capsys):
    assert main(["data", "synthetic", "--out", str(tmp_path / "w"), "--items", "500",
                 "--users", "100", "--events", "3000", "--dim", "16", "--quiet"]) == 0
    # not --quiet: the per-quantizer lines a user watches are printed too
    assert main(["bench-quantizer", "--embeddings", str(tmp_path / "w" / "item_embeddings.parquet"),
                 "--out", str(tmp_path / "bq"), "--scale-sizes", "4,8", "--steps", "30"]) == 0
    printed = capsys.readouterr().out
    assert all(f"{name:>9}: bits" in printed for name in ("mmtok", "faiss_rq", "lsh")), printed
    bench = json.loads((tmp_path / "bq" / "metrics.json").read_text())
    assert set(bench["quantizers"]) == {"mmtok", "faiss_rq", "faiss_pq", "kmeans", "lsh"}
    for name, m in bench["quantizers"].items():
        assert {"bits", "rel_mse", "recall_at_10", "kendall_tau", "utilization", "collision_rate",
                "fit_s", "encode_items_per_s"} <= set(m), name
        assert m["bits"] == (3 if name == "kmeans" else 10)
    mm = bench["quantizers"]["mmtok"]
    assert mm["codeword_sum"]["rel_mse"] > 0 and 0 <= mm["ids_changed_across_seeds"] <= 1
    assert mm["training"]["steps_run"] <= 30 and "codes_changed" in mm["training"]
    assert "codeword sum" in (tmp_path / "bq" / "report.md").read_text()
    assert (tmp_path / "bq" / "quality.png").exists() and (tmp_path / "bq" / "code_usage.png").exists()
    for kind in ("mmdict", "rq-kmeans"):
        assert main(["quantize", "--embeddings", str(tmp_path / "w" / "item_embeddings.parquet"),
                     "--out", str(tmp_path / kind), "--scale-sizes", "4,8", "--quantizer", kind,
                     "--steps", "20", "--quiet"]) == 0
        codes = pl.read_parquet(tmp_path / kind / "item_codes.parquet")
        assert codes.columns == ["item_id", "code_s_0", "code_s_1", "code_m_0", "code_m_1"]
        kind_saved = json.loads((tmp_path / kind / "quantizer" / "quantizer.json").read_text())["kind"]
        assert kind_saved == {"mmdict": "mmdict", "rq-kmeans": "residual_kmeans"}[kind]
    pl.DataFrame({"item_id": [1, 2], "text": ["red shoes", "blue kettle"]}).write_parquet(
        tmp_path / "items.parquet")
    assert main(["featurize", "--items", str(tmp_path / "items.parquet"),
                 "--out", str(tmp_path / "emb.parquet"), "--quiet"]) == 0
    emb = pl.read_parquet(tmp_path / "emb.parquet")
    assert emb.schema["embedding"] == pl.Array(pl.Float32, 384)


def test_bad_input_gives_a_clear_error_not_a_trace(tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.array([[1.0, np.inf]], dtype=np.float32))
    assert main(["quantize", "--embeddings", str(tmp_path / "bad.npy"),
                 "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "bad.npy" in err and "NaN/Inf" in err and "Traceback" not in err
    assert main(["featurize", "--items", str(tmp_path / "none.parquet"),
                 "--out", str(tmp_path / "e.parquet")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_users_own_events_go_split_quantize_train_register_serve(tmp_path, monkeypatch, capsys):
    """README's "train your own" path with commands only: the events and embeddings of a
    small synthetic world go through split, quantize, train --register, and the
    registered model version is served and answers a Score request of 200 candidates, 40
    of them brand-new ads that carry only their embedding."""
    import mlflow
    from google.protobuf import json_format

    from mmtok.serving import ModelSlot
    from proto.mmtok.v1 import Candidate, ScoreRequest

    store = f"sqlite:///{tmp_path / 'team.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    data, split, q = tmp_path / "data", tmp_path / "split", tmp_path / "q"
    assert main(["data", "synthetic", "--out", str(data), "--items", "1200", "--users", "300",
                 "--events", "24000", "--dim", "16", "--quiet"]) == 0
    # The world's newest 40 items stand in for brand-new ads: no event of theirs is used.
    events = pl.read_parquet(data / "events.parquet")
    embeddings = pl.read_parquet(data / "item_embeddings.parquet")
    new_ads = embeddings.sort("item_id").tail(40)
    events.filter(~pl.col("item_id").is_in(new_ads["item_id"].implode())).write_parquet(
        tmp_path / "events.parquet")
    embeddings.join(new_ads, on="item_id", how="anti").write_parquet(tmp_path / "emb.parquet")
    assert main(["split", "--events", str(tmp_path / "events.parquet"), "--out", str(split)]) == 0
    assert "cold test rows" in capsys.readouterr().out
    assert {p.name for p in split.iterdir()} >= {"train.parquet", "valid.parquet", "test.parquet"}
    assert main(["quantize", "--embeddings", str(tmp_path / "emb.parquet"), "--out", str(q),
                 "--quantizer", "rq-kmeans", "--scale-sizes", "8,16", "--quiet"]) == 0
    job = tmp_path / "job.toml"
    job.write_text(f'split_dir = "{split}"\nout = "{tmp_path / "unused"}"\nvariant = "ids"\n'
                   f'item_codes = "{q / "item_codes.parquet"}"\nquantizer = "{q / "quantizer"}"\n'
                   '\n[ranker]\nepochs = 2\n')
    assert main(["train", "--config", str(job), "--out", str(tmp_path / "run"),
                 "--register", "demo-ids", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "models:/demo-ids/1" in printed and "servable model ids-" in printed
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert not (tmp_path / "unused").exists()  # --out replaced the file's out

    # The logged model is an MLflow pyfunc model: predict gives the run's test scores.
    mlflow.set_tracking_uri(store)
    run_id = mlflow.search_runs(experiment_names=["mmtok-train"]).iloc[0]["run_id"]
    run = mlflow.get_run(run_id)
    assert run.data.metrics["test_auc"] == pytest.approx(metrics["auc"])
    assert run.data.metrics["valid_auc"] == pytest.approx(
        max(h["valid_auc"] for h in metrics["history"]))
    assert not any(k.startswith("test_world") for k in run.data.metrics)
    test = pl.read_parquet(split / "test.parquet")
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    np.testing.assert_allclose(pyfunc.predict(test.to_pandas()),
                               pl.read_parquet(tmp_path / "run" / "test_predictions.parquet")["prob"],
                               rtol=0, atol=1e-5)
    # A brand-new item carries its embedding in an `embedding` column; known ones need none.
    from ranker import ServableModel

    rows = test.head(4).with_columns(
        item_id=pl.Series([int(test["item_id"][0]), int(test["item_id"][1]),
                           *new_ads["item_id"].head(2).to_list()]),
        embedding=pl.Series([None, None, *new_ads["embedding"].head(2).to_list()]))
    offline = ServableModel.load(tmp_path / "run" / "model").score_events(
        rows.drop("embedding"), np.stack(new_ads["embedding"].head(2).to_numpy()))
    np.testing.assert_allclose(pyfunc.predict(rows.to_pandas()), offline, rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="embedding is empty"):
        pyfunc.predict(rows.with_columns(embedding=pl.lit(None, dtype=rows["embedding"].dtype))
                       .to_pandas())
    # An alias the team sets serves the same version.
    mlflow.MlflowClient().set_registered_model_alias("demo-ids", "champion", "1")
    assert ModelSlot("models:/demo-ids@champion").current.model_version == metrics["model_version"]

    user = int(test["user_id"][0])
    context = {name: int(test[name][0]) for name in test.columns if name.startswith("cat_")}
    known = test["item_id"].unique().sort().head(160).to_list()
    cands = [Candidate(item_id=i) for i in known] + [
        Candidate(item_id=int(i), embedding=e) for i, e in new_ads.iter_rows()]
    request = ScoreRequest(user_id=user, context=context, candidates=cands)
    (tmp_path / "request.json").write_text(json_format.MessageToJson(request))
    with ServeProcess("models:/demo-ids/1", cwd=tmp_path) as server:
        assert metrics["model_version"] in server.banner, server.banner
        assert main(["score", "--addr", server.addr, "--request", str(tmp_path / "request.json"),
                     "--json"]) == 0
        reply = json.loads(capsys.readouterr().out)
        assert len(reply["scores"]) == 200 and reply["model_version"] == metrics["model_version"]
        assert sum(reply["tokenized"]) == 40 and all(0 < s < 1 for s in reply["scores"])
        assert server.stop() == 0


def test_quantize_writes_the_same_codes_on_one_thread_and_two(tmp_path, clustered_embeddings):
    """Trained ID rows hang off the codes: `mmtok quantize` on the same file and seed must
    write the same codes whatever the machine's thread count (faiss' trainers would not),
    and quantizer.json says what the fit saw."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    np.save(tmp_path / "x.npy", clustered_embeddings)
    for kind, extra in (("mmdict", ["--steps", "20"]), ("rq-kmeans", [])):
        for threads in ("1", "2"):
            env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": threads,
                   "MKL_NUM_THREADS": threads}
            subprocess.run([sys.executable, "-m", "mmtok.cli", "quantize", "--embeddings",
                            str(tmp_path / "x.npy"), "--out", str(tmp_path / f"{kind}-{threads}"),
                            "--quantizer", kind, "--scale-sizes", "16,64", "--quiet", *extra],
                           env=env, check=True, capture_output=True)
        one, two = (pl.read_parquet(tmp_path / f"{kind}-{t}" / "item_codes.parquet") for t in "12")
        assert one.equals(two), kind
        fit = json.loads((tmp_path / f"{kind}-1" / "quantizer" / "quantizer.json").read_text())["fit"]
        assert fit["rows"] == 3000 and len(fit["input_sha256"]) == 64 and "torch" in fit["versions"]
