import numpy as np
import polars as pl
import pytest

from mmdata import (DataContractError, ItemEmbeddings, read_codes, read_embeddings, read_events,
                    read_items, write_embeddings)


def _events(**overrides):
    data = {"user_id": [1, 2, 3], "item_id": [10, 11, 10], "ts": [5, 6, 7], "label": [0, 1, 1],
            "cat_device": [0, 1, 2], "dense_price": [1.0, 2.5, 3.0]}
    data.update(overrides)
    return pl.DataFrame(data)


def test_events_round_trip_keeps_contract_dtypes(tmp_path):
    path = tmp_path / "events.parquet"
    _events().write_parquet(path)
    events = read_events(path)
    assert events.schema["label"] == pl.Int8
    assert events.schema["dense_price"] == pl.Float32
    assert events["item_id"].to_list() == [10, 11, 10]


@pytest.mark.parametrize("frame, message", [
    (_events().drop("ts"), "no column 'ts'"),
    (_events(user_id=["a", "b", "c"]), "column 'user_id' must be an integer"),
    (_events(label=[0.0, float("nan"), 1.0]), "column 'label' has 1 NaN"),
    (_events(label=[0, 2, 1]), "column 'label' has 1 values not in"),
    (_events(cat_device=[0.5, 1.0, 2.0]), "column 'cat_device' must be an integer"),
    (_events(dense_price=[1.0, float("inf"), 2.0]), "column 'dense_price' has null/NaN/Inf"),
])
def test_bad_events_name_file_and_column(tmp_path, frame, message):
    path = tmp_path / "bad_events.parquet"
    frame.write_parquet(path)
    with pytest.raises(DataContractError, match=message) as info:
        read_events(path)
    assert "bad_events.parquet" in str(info.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataContractError, match="does not exist"):
        read_events(tmp_path / "nope.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(DataContractError, match="cannot read events file"):
        read_events(junk)


def test_items_need_content_and_unique_ids(tmp_path):
    path = tmp_path / "items.parquet"
    pl.DataFrame({"item_id": [1, 2]}).write_parquet(path)
    with pytest.raises(DataContractError, match="neither a 'text' nor an 'image_path'"):
        read_items(path)
    pl.DataFrame({"item_id": [1, 1], "text": ["a", "b"]}).write_parquet(path)
    with pytest.raises(DataContractError, match="duplicate"):
        read_items(path)


def test_embeddings_parquet_list_array_and_npy(tmp_path):
    vectors = np.arange(12, dtype=np.float32).reshape(4, 3)
    emb = ItemEmbeddings(np.array([7, 3, 9, 1]), vectors)
    write_embeddings(emb, tmp_path / "e.parquet")
    back = read_embeddings(tmp_path / "e.parquet")
    np.testing.assert_array_equal(back.item_ids, [7, 3, 9, 1])
    np.testing.assert_array_equal(back.vectors, vectors)
    # a list column (not fixed-size array) written by another tool
    pl.DataFrame({"item_id": [1, 2], "embedding": [[1.0, 2.0], [3.0, 4.0]]}).write_parquet(
        tmp_path / "list.parquet")
    assert read_embeddings(tmp_path / "list.parquet").vectors.shape == (2, 2)
    np.save(tmp_path / "e.npy", vectors.astype(np.float16))
    npy = read_embeddings(tmp_path / "e.npy")
    assert npy.vectors.dtype == np.float32 and npy.item_ids.tolist() == [0, 1, 2, 3]


def test_bad_embeddings(tmp_path):
    pl.DataFrame({"item_id": [1, 2], "embedding": [[1.0, 2.0], [3.0]]}).write_parquet(
        tmp_path / "ragged.parquet")
    with pytest.raises(DataContractError, match="different widths"):
        read_embeddings(tmp_path / "ragged.parquet")
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan]], dtype=np.float32))
    with pytest.raises(DataContractError, match="NaN/Inf"):
        read_embeddings(tmp_path / "nan.npy")
    np.save(tmp_path / "w.npy", np.zeros((2, 5), dtype=np.float32))
    with pytest.raises(DataContractError, match="width 5, expected 8"):
        read_embeddings(tmp_path / "w.npy", expected_dim=8)
    np.save(tmp_path / "int.npy", np.zeros((2, 5), dtype=np.int32))
    with pytest.raises(DataContractError, match="float16 or float32"):
        read_embeddings(tmp_path / "int.npy")


def test_codes_contract(tmp_path):
    path = tmp_path / "codes.parquet"
    pl.DataFrame({"item_id": [1, 2], "code_s_0": [0, 3], "code_s_1": [1, 1], "note": ["a", "b"]}
                 ).write_parquet(path)
    assert read_codes(path).columns == ["item_id", "code_s_0", "code_s_1"]
    pl.DataFrame({"item_id": [1], "code_s_0": [-1]}).write_parquet(path)
    with pytest.raises(DataContractError, match="negative"):
        read_codes(path)
