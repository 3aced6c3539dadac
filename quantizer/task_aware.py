"""Task-aware tokens: the quantizer's encoder aligned with behaviour before the codes are cut.

Content-only codes spend their bits on whatever varies most in the content embedding;
a ranker needs the IDs to separate what makes users click. Before MmDict fits its
codebooks, its linear encoder (initialised to the content's principal axes) is trained
on the training period's engagement, then the codebooks are fitted on the aligned latent
as usual. The encoder stays one linear map, so a brand-new ad is tokenized from its
embedding alone, through the same encode op, and an item's codes never depend on its own
events: items without training events are not in the alignment at all.

Two signals (``TASK_SIGNALS``):

* ``"co_engagement"``: items clicked by the same user are pulled together by an in-batch
  contrastive loss (InfoNCE over negative squared latent distances, learned temperature),
  as QARM aligns with item-to-item engagement and LETTER adds collaborative alignment to
  an RQ-VAE.
* ``"clicks"``: a small click model, a learned vector and bias per user dotted with a
  low-rank projection of the item's latent, trained with the click loss on the training
  events, as Baidu's supervised visual IDs learn the quantization from clicks. The
  encoder then becomes the click model's metric (``click_metric_axes``): two items are
  as far apart as users' expected clicks on them differ, so the codes spend their bits
  on what changes clicks, not on the content's loudest variation. Then the click loss
  end to end through the codes (``finetune_through_codes``).

The alignment may only move variance between directions: the latent's total variance
is held at the content PCA's, so it cannot win by growing. Whether it is kept is decided
on held-out *items* (a share of the fit rows, chosen from the data's hash): the contrastive
training stops when their loss stops improving and keeps the best step; the click metric
is kept only if a click model that knows items by their IDs alone, as a ranker does,
predicts their clicks better from the codes cut there than from the content's codes. So
the alignment goes exactly as far as it generalises through the content to unseen items.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

TASK_SIGNALS = ("clicks", "co_engagement")
# The signal task-aware tokens align with unless told (measured: benchmarks/README.md).
DEFAULT_TASK_SIGNAL = "clicks"


@dataclass
class Engagement:
    """Training-period events on the rows of a fit matrix: who saw which row, and whether
    they clicked. Build it with ``from_events`` from the training events only."""

    users: np.ndarray  # (E,) int64, dense user index
    rows: np.ndarray  # (E,) int64, row of the fit matrix
    labels: np.ndarray  # (E,) float32, 1 = click
    n_users: int

    @classmethod
    def from_events(cls, events: pl.DataFrame, item_ids: np.ndarray) -> "Engagement":
        """``events``: user_id, item_id, label (the training period's); ``item_ids``: the
        fit matrix's item of each row. Events of items outside ``item_ids`` are dropped."""
        missing = {"user_id", "item_id", "label"} - set(events.columns)
        if missing:
            raise ValueError(f"engagement events need columns user_id, item_id, label; "
                             f"missing {sorted(missing)}")
        rows = pl.DataFrame({"item_id": np.asarray(item_ids), "_row": np.arange(len(item_ids))})
        kept = events.select("user_id", "item_id", "label").join(rows, on="item_id", how="inner")
        if kept.height == 0:
            raise ValueError("none of the engagement events names an item of the fit rows")
        users = kept["user_id"].rank("dense").cast(pl.Int64).to_numpy() - 1
        return cls(users=users, rows=kept["_row"].to_numpy().astype(np.int64),
                   labels=kept["label"].to_numpy().astype(np.float32),
                   n_users=int(users.max()) + 1)

    def __len__(self) -> int:
        return len(self.rows)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for a in (self.users, self.rows, self.labels):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def co_engaged_pairs(self, seed: int) -> np.ndarray:
        """(P, 2) rows clicked by the same user: each user's distinct clicked rows, in a
        seeded random order, paired with the next (a cycle), so every click is in two pairs."""
        clicked = self.labels > 0
        frame = pl.DataFrame({"u": self.users[clicked], "r": self.rows[clicked]})
        frame = frame.unique().sort("u", "r")  # one order whatever the events' order
        frame = frame.with_columns(key=pl.int_range(0, pl.len(), dtype=pl.UInt64).hash(seed))
        frame = frame.sort("u", "key")
        users, rows = frame["u"].to_numpy(), frame["r"].to_numpy()
        if len(rows) < 2:
            return np.empty((0, 2), dtype=np.int64)
        nxt = np.roll(np.arange(len(rows)), -1)
        # the last click of each user pairs with the user's first (the cycle closes)
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        ends = np.r_[starts[1:], len(rows)] - 1
        nxt[ends] = starts
        keep = rows != rows[nxt]  # users with one distinct click pair with themselves
        return np.stack([rows[keep], rows[nxt][keep]], 1).astype(np.int64)


@dataclass
class AlignmentConfig:
    signal: str = "co_engagement"
    # Most optimiser steps; the held-out items decide where it stops.
    max_steps: int = 2000
    batch_size: int = 1024
    lr: float = 1e-3
    # Share of the fit rows (items) held out to stop on.
    valid_fraction: float = 0.1
    validate_every: int = 50
    patience: int = 4
    # Starting temperature of the contrastive loss (learned), relative to the mean
    # squared distance of two random items: at 1 a partner twice as close as a random
    # item is e times likelier.
    temperature: float = 1.0
    # Width of the click model's user vectors ("clicks"), as a ranker's tables are.
    click_rank: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.signal not in TASK_SIGNALS:
            raise ValueError(f"task signal {self.signal!r}: choose from {list(TASK_SIGNALS)}")


class ClickModel(torch.nn.Module):
    """The small click model task-aware tokens learn from: a user's ``rank``-wide vector
    dotted with a shared projection of the item's latent, plus a bias per user and a
    global one. Low rank, as a ranker's embedding tables are: a vector per user as wide
    as the latent memorises a small log instead of reading the content."""

    def __init__(self, n_users: int, latent: int, rank: int, latent_variance: float) -> None:
        super().__init__()
        self.users = torch.nn.Embedding(n_users, rank)
        torch.nn.init.normal_(self.users.weight, std=1 / math.sqrt(rank))
        self.user_bias = torch.nn.Embedding(n_users, 1)
        torch.nn.init.zeros_(self.user_bias.weight)
        self.bias = torch.nn.Parameter(torch.zeros(()))
        # the projection starts at zero, so it reads only the content directions the
        # clicks taught it (``click_metric_axes`` is built from it)
        self.projection = torch.nn.Linear(latent, rank, bias=False)
        torch.nn.init.zeros_(self.projection.weight)
        self.scale = math.sqrt(latent / latent_variance)  # unit variance per latent axis

    def forward(self, users: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        item = self.projection(z * self.scale)
        return (self.users(users) * item).sum(1) + self.user_bias(users)[:, 0] + self.bias


class _AlignedEncoder(torch.nn.Module):
    """z = (x - mean) A^T, rescaled so that the latent's total variance stays the content
    PCA's (the alignment can only move variance between directions)."""

    def __init__(self, axes: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor,
                 n_users: int, click_rank: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(axes.clone())
        self.register_buffer("mean", mean.clone())
        self.register_buffer("cov", cov)
        self.target = float(torch.einsum("ld,de,le->", axes, cov, axes))
        self.log_temperature = torch.nn.Parameter(torch.zeros(()))
        self.clicks = ClickModel(n_users, axes.shape[0], click_rank, self.target)

    def scaled_weight(self) -> torch.Tensor:
        var = torch.einsum("ld,de,le->", self.weight, self.cov, self.weight)
        return self.weight * torch.sqrt(self.target / var.clamp_min(1e-12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.scaled_weight().T


def _contrastive(enc: _AlignedEncoder, x: torch.Tensor, pairs: torch.Tensor,
                 base_temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE per pair: each row's partner against the batch's other partners,
    over negative squared distances relative to two random items' (2 x total variance)."""
    za, zb = enc(x[pairs[:, 0]]), enc(x[pairs[:, 1]])
    dist = torch.cdist(za, zb).pow(2) / (2 * enc.target)
    logits = -dist / (base_temperature * enc.log_temperature.exp())
    target = torch.arange(len(pairs))
    return 0.5 * (F.cross_entropy(logits, target, reduction="none")
                  + F.cross_entropy(logits.T, target, reduction="none"))


def _click_loss(enc: _AlignedEncoder, x: torch.Tensor, users: torch.Tensor, rows: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(enc.clicks(users, enc(x[rows])), labels,
                                              reduction="none")


def align_encoder(x: torch.Tensor, axes: torch.Tensor, engagement: Engagement,
                  config: AlignmentConfig, *, data_seed: int, progress: bool = False,
                  cut_codes=None) -> tuple[torch.Tensor, ClickModel, dict]:
    """Aligns the linear encoder ``axes`` (latent, d) with ``engagement`` over the rows
    of ``x`` (n, d); returns the aligned weight (latent, d), the click model (trained with
    "clicks"; untouched otherwise), and a summary (what was tried, the held-out losses,
    pairs or events used, and ``kept``: whether the aligned encoder replaces the content's).

    "co_engagement" trains the encoder by gradient steps, stopped on the held-out items.
    "clicks" puts the encoder in the click model's metric (``click_metric_axes``) and
    keeps it only if the codes cut there let a click model that knows items by their IDs
    alone (``id_click_losses``) predict the held-out items' clicks better than the
    content's codes do: ``cut_codes(axes or None)`` returns the quantizer's start codes
    of every row of ``x`` on those axes (None: the content's own), and the code columns
    a ranker reads them by.

    ``data_seed`` picks the held-out items (the fit derives it from the input's hash)."""
    if config.signal == "clicks" and cut_codes is None:
        raise ValueError("the clicks signal needs cut_codes to judge its encoder by")
    torch.manual_seed(config.seed)
    mean = x.mean(0)
    centered = x - mean
    cov = centered.T @ centered / max(len(x) - 1, 1)
    enc = _AlignedEncoder(axes, mean, cov, engagement.n_users, config.click_rank)
    held = held_out_items(len(x), config.valid_fraction, data_seed)
    n_valid = int(held.sum())
    gen = torch.Generator().manual_seed(config.seed)
    if config.signal == "co_engagement":
        pairs = torch.from_numpy(engagement.co_engaged_pairs(config.seed))
        touches = held[pairs].any(1)
        train, valid = pairs[~touches], pairs[touches]
        # a held-out item's pair puts it first: the anchor is known from content alone
        swap = held[valid[:, 1]] & ~held[valid[:, 0]]
        valid = torch.where(swap[:, None], valid.flip(1), valid)
        used = {"pairs_train": len(train), "pairs_valid": len(valid)}
    else:
        rows = torch.from_numpy(engagement.rows)
        all_events = torch.stack([torch.from_numpy(engagement.users), rows], 1)
        labels_all = torch.from_numpy(engagement.labels)
        is_valid = held[rows]
        train, valid = all_events[~is_valid], all_events[is_valid]
        train_labels, valid_labels = labels_all[~is_valid], labels_all[is_valid]
        used = {"events_train": len(train), "events_valid": len(valid)}
    summary = {"signal": config.signal, "held_out_items": n_valid, **used,
               "steps_run": 0, "best_step": 0}
    if len(train) < config.batch_size // 4 or len(valid) < 32:
        summary.update(skipped="too little engagement to align on", kept=False)
        return axes.clone(), enc.clicks, summary
    batch = min(config.batch_size, len(train))

    def loss_on(idx: torch.Tensor, valid_set: bool) -> torch.Tensor:
        if config.signal == "co_engagement":
            part = (valid if valid_set else train)[idx]
            return _contrastive(enc, x, part, config.temperature)
        events = (valid if valid_set else train)[idx]
        labels = (valid_labels if valid_set else train_labels)[idx]
        return _click_loss(enc, x, events[:, 0], events[:, 1], labels)

    @torch.no_grad()
    def valid_losses() -> torch.Tensor:
        # fixed batches of the held-out set, the same every time it is scored
        n = len(valid)
        chunks = [torch.arange(s, min(s + batch, n)) for s in range(0, n, batch)]
        return torch.cat([loss_on(c, True) for c in chunks if len(c) >= 2])

    def step_once(opt: torch.optim.Optimizer) -> None:
        idx = torch.randint(len(train), (batch,), generator=gen)
        opt.zero_grad()
        loss_on(idx, False).mean().backward()
        opt.step()

    # First the content's own latent, read as it is (the encoder still): the score the
    # alignment must beat. Then everything, the encoder included.
    head = [p for name, p in enc.named_parameters() if name != "weight"]
    first = _until_stale(enc, torch.optim.Adam(head, lr=config.lr), step_once, valid_losses,
                         config, progress=progress, desc="click model on content"
                         if config.signal == "clicks" else "contrastive temperature")
    summary.update(head_steps=first["steps_run"], valid_loss_init=first["best"])
    if config.signal == "clicks":
        # The click model's metric: no gradient step on the encoder (a linear click
        # model reads any invertible re-weighting of the latent equally well, so its
        # held-out loss cannot choose one); judged through the codes instead.
        candidate = click_metric_axes(enc.clicks, axes, cov, engagement, ~held)
        content_codes, groups = cut_codes(None)
        metric_codes, _ = cut_codes(candidate)
        check = {name: id_click_losses(codes, groups, engagement, held, config)
                 for name, codes in (("content", content_codes), ("metric", metric_codes))}
        kept = significantly_lower(check["metric"], check["content"])
        summary.update(kept=kept, id_check={"content_loss": float(check["content"].mean()),
                                            "metric_loss": float(check["metric"].mean())},
                       tuples_moved=float((content_codes != metric_codes).any(1)
                                          .float().mean()))
        weight = candidate if kept else axes.clone()
    else:
        second = _until_stale(enc, torch.optim.Adam(enc.parameters(), lr=config.lr), step_once,
                              valid_losses, config, progress=progress,
                              desc=f"align encoder ({config.signal})", best=first["losses"])
        summary.update(steps_run=second["steps_run"], best_step=second["best_step"],
                       valid_loss_best=second["best"], kept=second["best_step"] > 0)
        with torch.no_grad():
            weight = enc.scaled_weight().detach().clone()

    with torch.no_grad():
        # how far the latent's variance moved between the content's principal axes
        share = torch.einsum("ld,de,le->l", weight, cov, weight) / enc.target
        base = torch.einsum("ld,de,le->l", axes, cov, axes) / enc.target
        summary["variance_moved"] = float(0.5 * (share - base).abs().sum())
    return weight, enc.clicks, summary


@torch.no_grad()
def click_metric_axes(clicks: ClickModel, axes: torch.Tensor, cov: torch.Tensor,
                      engagement: Engagement, fit_items: torch.Tensor) -> torch.Tensor:
    """(latent, d): the encoder under which the distance between two items is how
    differently the click model expects users to click on them.

    The click model scores user u on item x by ``<e_u, R (x - mean)>`` (plus biases), R
    the read map of its projection through the content encoder ``axes``. Averaged over
    the training events of the ``fit_items`` ((n,) bool) users, the squared gap between
    two items' scores is ``(x_i - x_j)^T M (x_i - x_j)`` with ``M = R^T E[e_u e_u^T] R``;
    the encoder is ``M``'s square root, its most weighted directions first (a direction
    no user's vector loads on gets none of the latent), rescaled to the content
    encoder's total variance. Codes cut there spend their bits on what changes clicks."""
    read = (clicks.projection.weight @ axes * clicks.scale).double()  # (rank, d)
    users = torch.from_numpy(engagement.users)[fit_items[torch.from_numpy(engagement.rows)]]
    counts = torch.bincount(users, minlength=clicks.users.num_embeddings).double()
    vectors = clicks.users.weight.double()
    second = (vectors * counts[:, None]).T @ vectors / counts.sum().clamp_min(1.0)
    metric = read.T @ second @ read  # (d, d)
    values, directions = torch.linalg.eigh(metric)
    values, directions = values.flip(0), directions.flip(1)  # most weighted first
    values = torch.where(values > values[0] * 1e-8, values, torch.zeros_like(values))
    latent = axes.shape[0]
    weight = (directions[:, :latent] * values[:latent].sqrt()).T  # (latent, d)
    cov = cov.double()
    target = torch.einsum("ld,de,le->", axes.double(), cov, axes.double())
    total = torch.einsum("ld,de,le->", weight, cov, weight).clamp_min(1e-30)
    return (weight * torch.sqrt(target / total)).float()


def _until_stale(module: torch.nn.Module, opt: torch.optim.Optimizer, step_once, valid_losses,
                 config: AlignmentConfig, *, progress: bool, desc: str,
                 best: torch.Tensor | None = None) -> dict:
    """Steps ``opt`` at most ``config.max_steps`` times, scoring the held-out examples'
    losses (``valid_losses()``, the same examples in the same order each time) every
    ``validate_every`` steps. A score counts as better only when it beats the best so far
    beyond noise: the paired mean improvement over the examples exceeds two standard
    errors. Stops after ``patience`` scores without one and leaves ``module`` at its best
    state (the start, if nothing beat ``best``, by default the start's own losses).
    Returns steps run, best step, the best mean loss and its per-example losses."""
    best_losses = valid_losses() if best is None else best
    out = {"steps_run": 0, "best_step": 0}
    best_state, since = copy.deepcopy(module.state_dict()), 0
    bar = tqdm(total=config.max_steps, desc=desc, unit="step", disable=not progress,
               mininterval=1.0)
    for step in range(1, config.max_steps + 1):
        step_once(opt)
        bar.update()
        out["steps_run"] = step
        if step % config.validate_every == 0:
            losses = valid_losses()
            bar.set_postfix(valid=f"{float(losses.mean()):.4f}",
                            best=f"{float(best_losses.mean()):.4f}")
            if significantly_lower(losses, best_losses):
                best_losses, out["best_step"] = losses, step
                best_state, since = copy.deepcopy(module.state_dict()), 0
            else:
                since += 1
                if since >= config.patience:
                    break
    bar.close()
    module.load_state_dict(best_state)
    out.update(best=float(best_losses.mean()), losses=best_losses)
    return out


def significantly_lower(losses: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether per-example ``losses`` beat ``reference`` (the same examples) beyond noise:
    the paired mean gain exceeds two standard errors."""
    gain = reference - losses
    return float(gain.mean()) > 2 * float(gain.std()) / math.sqrt(len(gain))


def held_out_items(n: int, fraction: float, data_seed: int) -> torch.Tensor:
    """(n,) bool: the items the alignment stops on, chosen from the data's hash."""
    held = torch.zeros(n, dtype=torch.bool)
    count = max(int(n * fraction), 1)
    held[torch.randperm(n, generator=torch.Generator().manual_seed(data_seed))[:count]] = True
    return held


def finetune_through_codes(net, x: torch.Tensor, engagement: Engagement, config: AlignmentConfig,
                           clicks: ClickModel, *, data_seed: int, progress: bool = False
                           ) -> dict:
    """The click loss end to end through the quantizer (``net``, a fitted
    ``MultiScaleResidualQuantizer``): the click model (``clicks``, from the alignment)
    reads each item's *quantized* latent (the sum of its codewords, the value the IDs
    carry), of the full code and of every coarser prefix (weighted as MmDict weighs its
    reconstructions, ``level_weight``);
    the encoder gets the straight-through gradient, each level's codebook the gradient
    through the soft assignment over all its codes (``net.quantize``), beside the
    codebooks' own loss and the commitment that keep the codes a quantization of the
    latent. After every step the encoder and codebooks are rescaled to the latent's
    starting total variance (the click loss may move variance between directions, not
    add it). Stops on the held-out items' click loss (their codes found by the beam
    search, no straight-through) and keeps the best step; the decoder's linear map is
    then refit by least squares to the moved codewords. Returns a summary."""
    torch.manual_seed(config.seed)
    held = held_out_items(len(x), config.valid_fraction, data_seed)
    rows, users = torch.from_numpy(engagement.rows), torch.from_numpy(engagement.users)
    labels = torch.from_numpy(engagement.labels)
    is_valid = held[rows]
    summary = {"events_train": int((~is_valid).sum()), "events_valid": int(is_valid.sum()),
               "steps_run": 0, "best_step": 0}
    if summary["events_train"] < config.batch_size or summary["events_valid"] < 32:
        summary["skipped"] = "too little engagement to fine-tune on"
        return summary
    mean = x.mean(0)
    centered = x - mean
    cov = centered.T @ centered / max(len(x) - 1, 1)

    def total_variance() -> torch.Tensor:
        w = net.encoder.weight
        return torch.einsum("ld,de,le->", w, cov, w)

    with torch.no_grad():
        target = float(total_variance())
    latent = net.latent_dim

    def quantized_latent(zq_parts: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(zq_parts, 0)
        return stacked.sum(0) if net.config.mode == "cascade" else stacked.mean(0)

    def logits(u: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        return clicks(u, zq)

    def prefix_weighted(losses: list[torch.Tensor]) -> torch.Tensor:
        # the full code's loss plus level_weight x the coarser prefixes' mean, as MmDict
        # weighs its reconstructions: a coarse prefix, shared by many items, should
        # predict clicks on its own (the ranker generalises to new ads through it)
        if len(losses) == 1:
            return losses[0]
        return losses[-1] + net.config.level_weight * torch.stack(losses[:-1]).mean(0)

    train_idx, valid_idx = torch.nonzero(~is_valid)[:, 0], torch.nonzero(is_valid)[:, 0]
    item_rows = torch.unique(rows[valid_idx])

    @torch.no_grad()
    def valid_losses() -> torch.Tensor:
        net.eval()
        lookup = torch.full((len(x),), -1, dtype=torch.long)
        lookup[item_rows] = torch.arange(len(item_rows))
        codes = net.search_codes(net.encoder(x[item_rows]))
        hard = [book[codes[:, j]] for j, book in enumerate(net.codebooks)]
        v = valid_idx
        return prefix_weighted([F.binary_cross_entropy_with_logits(
            logits(users[v], quantized_latent(net.latent(hard, cols))[lookup[rows[v]]]),
            labels[v], reduction="none") for cols in net.prefixes()])

    gen = torch.Generator().manual_seed(config.seed)
    batch = config.batch_size

    def step_once(opt: torch.optim.Optimizer) -> None:
        net.train()
        b = train_idx[torch.randint(len(train_idx), (batch,), generator=gen)]
        z = net.encoder(x[rows[b]])
        _, parts, aux = net.quantize(z, training=True)
        clicks_loss = prefix_weighted([F.binary_cross_entropy_with_logits(
            logits(users[b], quantized_latent(net.latent(parts, cols, z=z))), labels[b])
            for cols in net.prefixes()])
        loss = clicks_loss + (aux["codebook"] + aux["commit"]) * latent / target
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # back to the starting total variance
            s = math.sqrt(target / float(total_variance()))
            net.encoder.weight.mul_(s)
            net.encoder.bias.mul_(s)
            for book in net.codebooks:
                book.mul_(s)

    # First the click model alone on the codes as they are (every prefix): the score
    # moving the codes must beat. Then the codes, encoder and codebooks, as well.
    both = torch.nn.ModuleList([net, clicks])
    first = _until_stale(both, torch.optim.Adam(clicks.parameters(), lr=config.lr), step_once,
                         valid_losses, config, progress=progress,
                         desc="click model on the codes")
    slow = [*net.encoder.parameters(), *net.codebooks.parameters()]
    opt = torch.optim.Adam([{"params": slow, "lr": net.config.lr_codebooks},
                            {"params": clicks.parameters(), "lr": config.lr}])
    with torch.no_grad():
        before = net.search_codes(net.encoder(x))
    start_state = copy.deepcopy(net.state_dict())
    found = _until_stale(both, opt, step_once, valid_losses, config, progress=progress,
                         desc="fine-tune codes on clicks", best=first["losses"])
    net.eval()
    summary.update(head_steps=first["steps_run"], steps_run=found["steps_run"],
                   best_step=found["best_step"], valid_loss_init=first["best"],
                   valid_loss_best=found["best"])
    if summary["best_step"]:
        # The codes moved for the click model they were trained with; keep them only if
        # a model that, like the ranker, knows an item by its IDs alone and learns from
        # scratch predicts the held-out items' clicks better with them.
        with torch.no_grad():
            after = net.search_codes(net.encoder(x))
        check = {name: id_click_losses(codes, net.prefixes(), engagement, held, config)
                 for name, codes in (("content", before), ("moved", after))}
        kept = significantly_lower(check["moved"], check["content"])
        summary["id_check"] = {"content_loss": float(check["content"].mean()),
                               "moved_loss": float(check["moved"].mean()), "kept": kept}
        if kept:
            _refit_decoder(net, x)
        else:
            net.load_state_dict(start_state)
            summary["best_step"] = 0
    return summary


def id_click_losses(codes: torch.Tensor, prefixes: list[list[int]], engagement: Engagement,
                    held: torch.Tensor, config: AlignmentConfig) -> torch.Tensor:
    """Per-event click losses on the held-out items (``held``, (n,) bool) of a click
    model that knows an item only by its IDs, as the ranker does: one embedding row per
    distinct code prefix (s0, s0 s1, ...: the ranker's prefix n-grams), summed, dotted
    with a ``click_rank``-wide user vector, plus a bias per prefix row and per user.
    Trained from scratch on the other items' events, stopped on the held-out ones; a
    held-out item reaches it only through the prefixes it shares with trained items."""
    torch.manual_seed(config.seed)
    rows, users = torch.from_numpy(engagement.rows), torch.from_numpy(engagement.users)
    labels = torch.from_numpy(engagement.labels)
    ids = [torch.unique(codes[:, cols], dim=0, return_inverse=True)[1] for cols in prefixes]
    offsets = torch.tensor([0] + [int(i.max()) + 1 for i in ids]).cumsum(0)
    item_ids = torch.stack([i + o for i, o in zip(ids, offsets[:-1])], 1)  # (n, P)
    n_users = int(users.max()) + 1

    class IdClicks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rows = torch.nn.EmbeddingBag(int(offsets[-1]), config.click_rank + 1,
                                              mode="sum")
            torch.nn.init.zeros_(self.rows.weight)
            self.users = torch.nn.Embedding(n_users, config.click_rank + 1)
            torch.nn.init.normal_(self.users.weight, std=1 / math.sqrt(config.click_rank))
            with torch.no_grad():
                self.users.weight[:, -1] = 1.0  # the last column reads the rows' bias
            self.user_bias = torch.nn.Embedding(n_users, 1)
            torch.nn.init.zeros_(self.user_bias.weight)
            self.bias = torch.nn.Parameter(torch.zeros(()))

        def forward(self, events: torch.Tensor) -> torch.Tensor:
            u = users[events]
            item = self.rows(item_ids[rows[events]])
            return (self.users(u) * item).sum(1) + self.user_bias(u)[:, 0] + self.bias

    model = IdClicks()
    is_valid = held[rows]
    train_idx, valid_idx = torch.nonzero(~is_valid)[:, 0], torch.nonzero(is_valid)[:, 0]
    gen = torch.Generator().manual_seed(config.seed)

    def step_once(opt: torch.optim.Optimizer) -> None:
        b = train_idx[torch.randint(len(train_idx), (config.batch_size,), generator=gen)]
        loss = F.binary_cross_entropy_with_logits(model(b), labels[b])
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def valid_losses() -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(model(valid_idx), labels[valid_idx],
                                                  reduction="none")

    return _until_stale(model, torch.optim.Adam(model.parameters(), lr=config.lr), step_once,
                        valid_losses, config, progress=False, desc="ID click model")["losses"]


@torch.no_grad()
def _refit_decoder(net, x: torch.Tensor) -> None:
    """The decoder's linear map refit by least squares to the (moved) codewords' sums; its
    residual MLP, trained on the old codewords, is switched off."""
    codes = net.search_codes(net.encoder(x))
    parts = net.codewords(codes)
    zq = torch.cat(parts, 1) if net.config.mode == "parallel" else torch.stack(parts, 0).sum(0)
    design = torch.cat([zq, torch.ones(len(zq), 1)], 1).double()
    solution = torch.linalg.lstsq(design, x.double()).solution.float()  # (latent + 1, d)
    net.decoder.weight.copy_(solution[:-1].T)
    net.decoder.bias.copy_(solution[-1])
    if net.refine is not None:
        net.refine[2].weight.zero_()
        net.refine[2].bias.zero_()
