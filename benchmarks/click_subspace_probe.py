"""A probe for task-aware tokens: the item embeddings with the content directions that
predict clicks given more of the variance, for ``mmtok quantize`` to cut codes from.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/click_subspace_probe.py \
        --events runs/bench-1m-5seeds/split/train.parquet \
        --item-embeddings runs/syn-taste/item_embeddings.parquet \
        --out runs/click-subspace/embeddings.parquet --share 1.0
    .venv/bin/mmtok quantize --embeddings runs/click-subspace/embeddings.parquet \
        --out runs/click-subspace/quantized

A low-rank click model, ``logit = b + b_user + <e_user, W x_item>`` (``e_user`` and the
rows of ``W`` ``--rank`` wide), is trained on the training events of 90% of the items
and stopped on the other 10% of the items' events (the best step of those scored every
``--validate-every`` steps is kept; training ends after ``--patience`` scores without a
new best), so ``W`` reads what generalises through content to items it has not seen. The
row space of ``W`` is the content's click-predictive subspace. Every item's centred
embedding is split into its part inside that subspace and the rest, and the two are
rescaled so the subspace holds ``--share`` of the total variance (1.0: the codes see only
what predicts clicks); the total variance is kept. Only training events are read, and an
item's embedding is transformed by content alone, so items without events (cold) are
treated as every other item.

Measured in ``benchmarks/README.md`` (task-aware tokens, issue 22).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from mmdata import read_embeddings
from quantizer import Engagement


def click_subspace(x: np.ndarray, users: np.ndarray, rows: np.ndarray, labels: np.ndarray, *,
                   rank: int, seed: int, validate_every: int, patience: int,
                   max_steps: int = 20_000, batch_size: int = 4096, lr: float = 3e-3
                   ) -> tuple[np.ndarray, dict]:
    """(d, rank) orthonormal basis of the content directions the click model reads, and
    its training summary."""
    torch.manual_seed(seed)
    seen = np.unique(rows)
    held = np.random.default_rng(seed).choice(seen, max(1, len(seen) // 10), replace=False)
    is_held = np.zeros(len(x), bool)
    is_held[held] = True
    fit_events = torch.from_numpy(np.flatnonzero(~is_held[rows]))
    held_events = torch.from_numpy(np.flatnonzero(is_held[rows]))
    content = x[seen]
    xt = torch.from_numpy(((x - content.mean(0)) / content.std(0).mean()).astype(np.float32))
    n_users = int(users.max()) + 1
    user_vec = torch.nn.Embedding(n_users, rank)
    user_bias = torch.nn.Embedding(n_users, 1)
    torch.nn.init.normal_(user_vec.weight, std=0.01)
    torch.nn.init.zeros_(user_bias.weight)
    read = torch.nn.Linear(x.shape[1], rank, bias=False)
    torch.nn.init.normal_(read.weight, std=0.01)
    bias = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([*user_vec.parameters(), *user_bias.parameters(),
                            *read.parameters(), bias], lr=lr)
    u_all, r_all = torch.from_numpy(np.array(users)), torch.from_numpy(np.array(rows))
    y_all = torch.from_numpy(labels.astype(np.float32))

    def loss(events: torch.Tensor, content_on: bool = True) -> torch.Tensor:
        u = u_all[events]
        logit = bias + user_bias(u).squeeze(1)
        if content_on:
            logit = logit + (user_vec(u) * read(xt[r_all[events]])).sum(1)
        return F.binary_cross_entropy_with_logits(logit, y_all[events])

    best = {"step": 0, "held_out_loss": float("inf"), "weight": read.weight.detach().clone()}
    since = 0
    for step in range(1, max_steps + 1):
        batch = fit_events[torch.randint(len(fit_events), (batch_size,))]
        opt.zero_grad()
        loss(batch).backward()
        opt.step()
        if step % validate_every == 0:
            with torch.no_grad():
                held_out = float(loss(held_events))
            if held_out < best["held_out_loss"]:
                best = {"step": step, "held_out_loss": held_out,
                        "weight": read.weight.detach().clone()}
                since = 0
            else:
                since += 1
                if since >= patience:
                    break
    with torch.no_grad():
        without_content = float(loss(held_events, content_on=False))
    basis, _ = np.linalg.qr(best["weight"].numpy().T.astype(np.float64))  # (d, rank)
    return basis, {"best_step": best["step"], "steps_run": step,
                   "held_out_loss": best["held_out_loss"],
                   "held_out_loss_user_bias_only_at_stop": without_content,
                   "held_out_items": int(len(held))}


def reweight(x: np.ndarray, basis: np.ndarray, share: float) -> tuple[np.ndarray, float]:
    """``x`` with the subspace of ``basis`` holding ``share`` of the centred variance (the
    total kept); returns it and the share the subspace held before."""
    centred = x - x.mean(0)
    inside = centred @ basis @ basis.T
    outside = centred - inside
    v_in, v_out = (inside ** 2).sum(1).mean(), (outside ** 2).sum(1).mean()
    total = v_in + v_out
    scaled = inside * np.sqrt(share * total / v_in)
    if share < 1:
        scaled = scaled + outside * np.sqrt((1 - share) * total / v_out)
    return scaled.astype(np.float32), float(v_in / total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=Path, required=True,
                        help="the training period's events (user_id, item_id, label)")
    parser.add_argument("--item-embeddings", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="embeddings parquet to write")
    parser.add_argument("--share", type=float, default=1.0,
                        help="share of the variance the click-predictive subspace gets")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--validate-every", type=int, default=100)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 < args.share <= 1:
        raise SystemExit(f"--share must be in (0, 1], got {args.share}")
    emb = read_embeddings(args.item_embeddings)
    x = emb.vectors.astype(np.float64)
    engagement = Engagement.from_events(
        pl.read_parquet(args.events, columns=["user_id", "item_id", "label"]), emb.item_ids)
    basis, summary = click_subspace(x, engagement.users, engagement.rows,
                                    engagement.labels, rank=args.rank,
                                    seed=args.seed, validate_every=args.validate_every,
                                    patience=args.patience)
    out, before = reweight(x, basis, args.share)
    print(f"click model: best step {summary['best_step']} of {summary['steps_run']}, "
          f"held-out items' loss {summary['held_out_loss']:.4f} (user and global bias only: "
          f"{summary['held_out_loss_user_bias_only_at_stop']:.4f}); the {args.rank}-wide "
          f"click-predictive subspace held {before:.3f} of the variance, now {args.share}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"item_id": emb.item_ids, "embedding": list(out)}).with_columns(
        pl.col("embedding").cast(pl.Array(pl.Float32, out.shape[1]))).write_parquet(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
