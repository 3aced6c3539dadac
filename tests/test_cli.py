import json

import numpy as np
import polars as pl
import pytest

from mmtok.cli import main


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "2", "--quantizer", "mmdict",
                 "--quantizer-steps", "60", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["variants"]) == {"no_content", "dense", "recon", "ids", "ids_dense"}
    for m in metrics["variants"].values():
        assert 0.6 < m["auc"] < 0.8 and m["rows_cold"] > 500
    assert set(metrics["quantization_loss"]) == {"lift_lost", "lift_lost_cold", "lift_lost_recon"}
    recon = metrics["intervals"]["lift_lost_recon"]
    assert recon["value"] == pytest.approx(metrics["quantization_loss"]["lift_lost_recon"])
    assert recon["low"] < recon["value"] < recon["high"]
    report = (out / "report.md").read_text()
    assert "| ids |" in report and "variant_auc.png" in report
    assert (out / "variant_auc.png").stat().st_size > 10_000
    codes = pl.read_parquet(out / "data" / "item_codes.parquet")
    assert codes.height == 1682 and "code_l_1" in codes.columns
    assert metrics["quantizer"]["kind"] == "mmdict"
    assert (out / "quantizer" / "weights.safetensors").exists()
    # the MLflow store holds the parent run and one nested run per variant
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["mmtok-demo"])
    assert len(runs) == 6
    parent = runs[runs["run_id"] == metrics["mlflow_run_id"]].iloc[0]
    assert parent["metrics.lift_lost"] == pytest.approx(metrics["quantization_loss"]["lift_lost"])
    # the ids variant is left servable at out/model, and as the parent run's artifact
    from mmtok.serving import ModelSlot
    from ranker.bundle import ServableModel

    served = ServableModel.load(out / "model")
    assert served.model_version.startswith("demo-ids-") and served.quantizer.kind == "mmdict"
    slot = ModelSlot(f"runs:/{metrics['mlflow_run_id']}/model")
    assert slot.current.model_version == served.model_version


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


def test_data_featurize_quantize_commands(tmp_path):
    assert main(["data", "synthetic", "--out", str(tmp_path / "w"), "--items", "500",
                 "--users", "100", "--events", "3000", "--dim", "16", "--quiet"]) == 0
    assert main(["bench-quantizer", "--embeddings", str(tmp_path / "w" / "item_embeddings.parquet"),
                 "--out", str(tmp_path / "bq"), "--scale-sizes", "4,8", "--steps", "30",
                 "--quiet"]) == 0
    bench = json.loads((tmp_path / "bq" / "metrics.json").read_text())
    assert set(bench["quantizers"]) == {"mmtok", "faiss_rq", "faiss_pq", "kmeans", "lsh"}
    for name, m in bench["quantizers"].items():
        assert {"bits", "rel_mse", "recall_at_10", "kendall_tau", "utilization", "collision_rate",
                "fit_s", "encode_items_per_s"} <= set(m), name
        assert m["bits"] == (3 if name == "kmeans" else 10)
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
