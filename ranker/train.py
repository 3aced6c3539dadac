"""Training and evaluation of one ranker variant (single process, CPU)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ranker.features import EncodedEvents, FeatureEncoder
from ranker.metrics import auc, ranking_metrics
from ranker.model import RankerConfig, RankingModel


@dataclass
class TrainResult:
    model: RankingModel
    # One dict per epoch: train_loss, valid_auc, seconds.
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    train_examples_per_s: float = 0.0


@torch.inference_mode()
def predict(model: RankingModel, features: FeatureEncoder, events: EncodedEvents,
            *, batch_size: int = 4096) -> np.ndarray:
    """Click probabilities, (N,) float64."""
    model.eval()
    out = []
    for start in range(0, len(events), batch_size):
        index = torch.arange(start, min(start + batch_size, len(events)))
        dense, kjt, _ = features.batch(events, index)
        out.append(torch.sigmoid(model(dense, kjt)).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def evaluate(model: RankingModel, features: FeatureEncoder, events: EncodedEvents) -> dict:
    probs = predict(model, features, events)
    return ranking_metrics(events.labels.numpy(), probs, events.is_cold.numpy())


def train_ranker(features: FeatureEncoder, train: EncodedEvents, valid: EncodedEvents,
                 config: RankerConfig, *, progress: bool = True, desc: str = "train") -> TrainResult:
    """Trains with early stopping on validation AUC; returns the best epoch's model.

    Embedding tables use Adagrad (the usual choice for sparse rows), the MLPs Adam.
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = RankingModel(features.sparse_names, features.sparse_sizes,
                         features.dense_in_features, config)
    sparse_opt = torch.optim.Adagrad(model.sparse_parameters(), lr=config.lr_sparse)
    dense_opt = torch.optim.Adam(model.dense_parameters(), lr=config.lr_dense,
                                 weight_decay=config.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    result = TrainResult(model=model)
    best_auc, best_state, stale = -1.0, None, 0
    seen, train_seconds = 0, 0.0
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        n_batches = (len(train) + config.batch_size - 1) // config.batch_size
        losses = []
        start = time.perf_counter()
        bar = tqdm(range(n_batches), desc=f"{desc} epoch {epoch + 1}/{config.epochs}",
                   unit="batch", disable=not progress, leave=False, mininterval=1.0)
        for b in bar:
            index = order[b * config.batch_size:(b + 1) * config.batch_size]
            dense, kjt, labels = features.batch(train, index, item_id_dropout=config.item_id_dropout,
                                                generator=generator)
            loss = loss_fn(model(dense, kjt), labels)
            sparse_opt.zero_grad()
            dense_opt.zero_grad()
            loss.backward()
            sparse_opt.step()
            dense_opt.step()
            losses.append(loss.item())
        seconds = time.perf_counter() - start
        train_seconds += seconds
        seen += len(train)
        valid_auc = auc(valid.labels.numpy(), predict(model, features, valid))
        result.history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                               "valid_auc": valid_auc, "seconds": seconds})
        if progress:
            tqdm.write(f"{desc} epoch {epoch + 1}: train loss {np.mean(losses):.4f}  "
                       f"valid AUC {valid_auc:.4f}  ({seconds:.1f}s)")
        if valid_auc > best_auc:
            best_auc, best_state, stale = valid_auc, copy.deepcopy(model.state_dict()), 0
            result.best_epoch = epoch + 1
        else:
            stale += 1
            if stale >= config.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    result.train_examples_per_s = seen / max(train_seconds, 1e-9)
    return result
