"""The MmDict quantizer: learned multi-scale residual quantization.

Implements the multimodal dictionary of M2D-BERT / MmDict (Baidu, CIKM 2022,
arXiv 2209.11727) in the spirit of RQ-VAE (arXiv 2203.01941) and QINCo (ICML 2024):

* **Scales** S, M, L with growing codebook sizes; each scale has ``levels`` levels, a
  *center* code then *residual* codes, so the default item carries 3 x 2 = 6 IDs.
  ``mode="parallel"`` (default, chosen by the ranking task - see ``benchmarks/README.md``):
  every scale quantizes the whole latent on its own; an orthogonality penalty between
  the scales' codewords makes them describe different things (M2D-BERT's complementary
  dictionaries), and the decoder reads all scales. Each scale's center code is then a
  partition of all items at its own granularity (16, 64, 256 regions), which a ranker's
  ID rows generalise from.
  ``mode="cascade"``: scale M quantizes what scale S left over, L what M left (one
  residual chain, as in RQ-VAE semantic IDs), so only S IDs are a partition and the
  full tuple is nearly unique; it reconstructs the embedding better at equal bits.
  Codes are found by beam search over each residual chain.
* **Encoder**: a linear map into a latent space (initialised to the data's principal
  axes), so encoding stays one matmul plus nearest-code searches (the fused kernel's job).
* **Sparse activation + straight-through estimator**: each level's activations are a
  softmax over negative distances to *all* codes; the forward pass keeps the arg-max
  code, the backward pass flows through the soft assignment, so activated and
  non-activated codes keep exchanging information.
* **No collapse**: codebooks start from faiss (its beam-search residual quantizer
  trainer for a cascade, k-means per level for parallel scales), a batch entropy bonus
  on code usage, and dead-code restart (unused codes re-seeded from live residuals).
* **Codebooks that move**: from faiss' start, the codebooks of a chain are refit jointly
  by least squares, alternating with the beam search (each level then fits the chain's
  final error, not only what the earlier levels left), then encoder, codebooks and
  decoder train by gradient (the decoder at ``lr``, encoder and codebooks at
  ``lr_codebooks``). Both stop on held-out fit rows: the refinement at the first
  iteration that does not help, the gradient steps after ``patience`` scores without a
  better one; the network is then trained again on all rows for the counts found.
* **Decoder**: a linear map back plus a small residual MLP, rebuilding the embedding
  from the IDs. The loss keeps reconstruction error low, at every level (each prefix of
  the codes is decoded and scored, so coarse IDs mean something alone), **and** the
  partial order: a listwise loss matches, for every item of a batch, the softmax over its cosine
  similarities to the other items before and after quantization.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from kernels import build_encode_tables, multiscale_encode
from quantizer.base import (as_rows, check_codes, check_input, fit_record, single_threaded,
                            read_quantizer_meta,
                            scale_code_layout, write_quantizer_meta)
from quantizer.baselines import train_rq_codebooks
from quantizer.residual_kmeans import nearest_code
from quantizer.task_aware import (TASK_SIGNALS, AlignmentConfig, Engagement, align_encoder,
                                  finetune_through_codes)


@dataclass
class MmDictConfig:
    # Codebook size per scale, coarse to fine.
    scale_sizes: list[int] = field(default_factory=lambda: [16, 64, 256])
    # Levels per scale: a center code, then residual codes.
    levels: int = 2
    # "cascade": scale s quantizes the residual of scales < s; "parallel": each scale
    # quantizes the whole latent, scales pushed apart by an orthogonality penalty.
    mode: str = "parallel"
    # Latent width (at most the input width; None keeps the input width). A narrower
    # latent trains faster but drops the variance outside its principal axes.
    latent_dim: int | None = None
    # Hidden width of the decoder's residual MLP (0 disables it).
    decoder_hidden: int = 256
    # Most optimiser steps (batches); the data is cycled as often as that takes. The
    # fit usually stops earlier, on the held-out rows (below).
    steps: int = 1000
    batch_size: int = 1024
    # Share of the fit rows held out (at most validation_max_rows) to score the network
    # every validate_every steps; training stops after `patience` scores without a
    # better one and keeps the best step's weights.
    validation_fraction: float = 0.1
    validation_max_rows: int = 4096
    validate_every: int = 50
    patience: int = 4
    # Before the gradient steps, the codebooks are refit jointly by least squares,
    # alternating with the beam search, for at most this many iterations (stopped on
    # the held-out rows); the ridge pulls each codeword towards its current value.
    refine_iterations: int = 20
    refine_ridge: float = 1.0
    # Learning rate of the decoder, and of the encoder + codebooks (which start at PCA +
    # faiss' residual quantizer: their entries are ~1/sqrt(d)).
    lr: float = 1e-3
    lr_codebooks: float = 1e-4
    # Temperature of the soft assignment the STE backpropagates through (relative to
    # the mean squared distance of the level's codes).
    assign_temperature: float = 0.1
    # Weight of the coarser levels' reconstruction losses (their mean), beside the full
    # code's: every prefix of the codes should rebuild the item on its own.
    level_weight: float = 1.0
    # Weight of the listwise order loss and its similarity temperature.
    rank_weight: float = 1.0
    rank_temperature: float = 0.5
    # Queries per batch for the order loss, each ranked against the whole batch
    # (None: every item of the batch; fewer queries train faster and a little worse).
    rank_queries: int | None = None
    # VQ-VAE commitment weight (keeps the encoder close to its codes).
    commitment: float = 0.25
    # Bonus for spreading each batch's code usage (entropy of mean soft assignment).
    entropy_weight: float = 0.01
    # Orthogonality penalty between the scales' codewords (parallel mode).
    ortho_weight: float = 0.1
    # Every `restart_every` steps, codes hit fewer than `dead_code_min_hits` times in
    # that window are re-seeded from live residuals.
    restart_every: int = 100
    dead_code_min_hits: int = 1
    # Task-aware tokens (``quantizer.task_aware``): None (content only), or the behaviour
    # the encoder is aligned with before the codebooks are fitted, "co_engagement" or
    # "clicks"; ``fit`` then needs the training period's ``engagement``.
    task_signal: str | None = None
    # Most alignment steps (it stops earlier on held-out items).
    task_steps: int = 2000
    seed: int = 0
    # Beam width of the code search (1 = greedy arg-min level by level). A wider beam
    # picks code tuples with lower total error, as faiss' residual quantizer does.
    beam_size: int = 5
    # Rows per encode batch (bounds memory at batch x beam x codebook size floats).
    encode_batch_size: int = 16_384
    device: str = "cpu"

    def __post_init__(self) -> None:
        scale_code_layout(self.scale_sizes, self.levels)
        if self.mode not in ("cascade", "parallel"):
            raise ValueError(f"mode must be 'cascade' or 'parallel', got {self.mode!r}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.task_signal is not None and self.task_signal not in TASK_SIGNALS:
            raise ValueError(f"task_signal must be None or one of {list(TASK_SIGNALS)}, "
                             f"got {self.task_signal!r}")
        if self.steps < 1 or self.validate_every < 1 or self.patience < 1:
            raise ValueError(f"steps, validate_every and patience must be >= 1, got "
                             f"{self.steps}, {self.validate_every}, {self.patience}")


class MultiScaleResidualQuantizer(nn.Module):
    """The trainable network: encoder, (scales x levels) codebooks, decoder.

    Args:
        dim: input embedding width.
        config: see ``MmDictConfig``.

    ``forward(x)`` returns ``(x_hat, codes, losses)``; ``x_hat`` is exactly what
    ``decode(codes)`` gives (the round trip), gradients reach all parameters.
    """

    def __init__(self, dim: int, config: MmDictConfig) -> None:
        super().__init__()
        self.config = config
        self.dim = dim
        latent = min(config.latent_dim or dim, dim)
        self.latent_dim = latent
        self.encoder = nn.Linear(dim, latent)
        self.codebooks = nn.ParameterList(
            [nn.Parameter(torch.zeros(k, latent)) for k in config.scale_sizes
             for _ in range(config.levels)])
        n_scales = len(config.scale_sizes)
        decoder_in = latent * (n_scales if config.mode == "parallel" else 1)
        self.decoder = nn.Linear(decoder_in, dim)
        if config.decoder_hidden:
            self.refine = nn.Sequential(nn.Linear(decoder_in, config.decoder_hidden), nn.GELU(),
                                        nn.Linear(config.decoder_hidden, dim))
            nn.init.zeros_(self.refine[2].weight)
            nn.init.zeros_(self.refine[2].bias)
        else:
            self.refine = None

    @property
    def n_codes(self) -> int:
        return len(self.codebooks)

    def _scale_slices(self):
        levels = self.config.levels
        return [range(s * levels, (s + 1) * levels) for s in range(len(self.config.scale_sizes))]

    @torch.no_grad()
    def search_codes(self, z: torch.Tensor, chunk_rows: int = 2048) -> torch.Tensor:
        """Codes (n, J) by beam search over each residual chain (a whole cascade, or each
        parallel scale): keeps the ``beam_size`` partial code tuples with the least
        residual error at every level, returns the best full tuple.

        Rows are searched ``chunk_rows`` at a time so that the (rows, beam, latent)
        residuals stay in cache; beams move by row gathers (``index_select``) and the
        distances are formed in place - the arithmetic, and so the codes, are those of
        the plain formulation ``||r||^2 - 2 r.c + ||c||^2``.
        """
        cfg = self.config
        chains = ([list(range(self.n_codes))] if cfg.mode == "cascade"
                  else [list(r) for r in self._scale_slices()])
        out = torch.empty(len(z), self.n_codes, dtype=torch.long, device=z.device)
        norms = [book.pow(2).sum(1) for book in self.codebooks]  # (K,) per level
        dim = z.shape[1]
        for start in range(0, len(z), chunk_rows):
            zc = z[start:start + chunk_rows]
            n = len(zc)
            row = torch.arange(n, device=z.device)[:, None]  # (n, 1)
            for chain in chains:
                residual = zc[:, None, :]  # (n, B, latent), B = 1 at the start
                codes = torch.empty(n, 1, 0, dtype=torch.long, device=z.device)
                for j in chain:
                    book = self.codebooks[j]
                    k = len(book)
                    dist = (residual @ book.T).mul_(-2.0)  # (n, B, K)
                    dist.add_(residual.pow(2).sum(-1, keepdim=True)).add_(norms[j])
                    width = min(cfg.beam_size, dist.shape[1] * k)
                    best = dist.reshape(n, -1).topk(width, dim=1, largest=False, sorted=True).indices
                    parent, code = best // k, best % k  # (n, width)
                    flat_parent = (row * residual.shape[1] + parent).reshape(-1)
                    residual = residual.reshape(-1, dim).index_select(0, flat_parent)
                    residual = residual.sub_(book.index_select(0, code.reshape(-1))).view(n, width, dim)
                    codes = torch.cat([codes.gather(1, parent[..., None].expand(-1, -1, codes.shape[2])),
                                       code[..., None]], dim=2)
                out[start:start + n, chain] = codes[:, 0]
        return out

    def prefixes(self) -> list[list[int]]:
        """The code columns each level's reconstruction uses, coarse to fine: a cascade's
        chain prefixes (s0, s0 s1, s0 s1 m0, ...); for parallel scales, every scale's
        levels up to the same depth (all centers, then centers + residuals, ...)."""
        if self.config.mode == "cascade":
            return [list(range(j + 1)) for j in range(self.n_codes)]
        return [[j for levels in self._scale_slices() for j in levels[:depth + 1]]
                for depth in range(self.config.levels)]

    def id_groups(self) -> list[list[int]]:
        """The code columns a ranker knows an item by: every code alone, then each scale's
        chain of levels (its prefix n-grams: s0 s1, m0 m1, ...)."""
        singles = [[j] for j in range(self.n_codes)]
        return singles + [list(levels[:depth + 1]) for levels in self._scale_slices()
                          for depth in range(1, len(levels))]

    def quantize(self, z: torch.Tensor, *, training: bool = False):
        """Nearest codes (greedy, or by beam search), scale by scale, level by level.

        Args: z: (n, latent).
        Returns: codes (n, J) int64, the per-code quantized latents (list of J (n, latent)),
            and, when training, a dict of auxiliary losses.

        The forward value of every quantized latent is its arg-max codeword. When
        training, the decoder's gradient takes one path to each part: to the codebooks
        through the soft assignment over *all* codes of a level (computed from the
        detached residual, so activated and non-activated codes keep exchanging
        information), and to the encoder through the straight-through identity that
        ``latent`` adds once per decoded chain.
        """
        cfg = self.config
        codes, quantized = [], []
        codebook_loss = z.new_zeros(())
        commit = z.new_zeros(())
        entropy = z.new_zeros(())
        planned = self.search_codes(z.detach()) if cfg.beam_size > 1 else None
        target = z.detach()
        for levels in self._scale_slices():
            if cfg.mode == "parallel" or not codes:
                residual = target
            hard_sum = torch.zeros_like(target)
            for j in levels:
                book = self.codebooks[j]  # (K, latent)
                if training or planned is None:
                    dist = (residual.pow(2).sum(1, keepdim=True) - 2.0 * residual @ book.T
                            + book.pow(2).sum(1)[None, :])  # (n, K)
                idx = planned[:, j] if planned is not None else dist.detach().argmin(1)
                hard = book[idx]
                if training:
                    scale_t = dist.detach().mean().clamp_min(1e-8) * cfg.assign_temperature
                    soft_w = torch.softmax(-dist / scale_t, dim=1)  # (n, K) activations
                    soft = soft_w @ book
                    q = soft + (hard - soft).detach()  # value: the arg-max codeword
                    codebook_loss = codebook_loss + F.mse_loss(hard, residual)
                    usage = soft_w.mean(0)
                    entropy = entropy - (usage * torch.log(usage + 1e-9)).sum() / math.log(len(book))
                else:
                    q = hard
                codes.append(idx)
                quantized.append(q)
                hard_sum = hard_sum + hard.detach()
                residual = residual - hard.detach()
            if training and cfg.mode == "parallel":  # each scale quantizes all of z
                commit = commit + F.mse_loss(z, hard_sum)
        if training and cfg.mode == "cascade":  # the chain quantizes z once
            commit = F.mse_loss(z, target - residual)
        codes = torch.stack(codes, 1)
        if not training:
            return codes, quantized, {}
        return codes, quantized, {"codebook": codebook_loss, "commit": commit * cfg.commitment,
                                  "entropy": entropy / self.n_codes}

    def latent(self, quantized: list[torch.Tensor], columns: list[int] | None = None,
               z: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-scale latents from the per-code quantized latents, keeping only
        ``columns`` (None: all). Given ``z`` (training), adds the straight-through
        identity ``z - sg(z)`` once per chain: once for a cascade, once per parallel scale."""
        keep = set(range(len(quantized)) if columns is None else columns)
        out = []
        for s, levels in enumerate(self._scale_slices()):
            parts = [quantized[j] for j in levels if j in keep]
            scale_q = torch.stack(parts, 0).sum(0) if parts else torch.zeros_like(quantized[0])
            if z is not None and (self.config.mode == "parallel" or s == 0):
                scale_q = scale_q + (z - z.detach())
            out.append(scale_q)
        return out

    def decode_latent(self, quantized: list[torch.Tensor]) -> torch.Tensor:
        """Per-scale latents -> (n, d)."""
        if self.config.mode == "parallel":
            zq = torch.cat(quantized, dim=1)  # (n, S * latent)
        else:
            zq = torch.stack(quantized, 0).sum(0)  # (n, latent)
        out = self.decoder(zq)
        if self.refine is not None:
            out = out + self.refine(zq)
        return out

    def codewords(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """Per-scale sums of the codewords named by ``codes`` (n, J)."""
        out = []
        for levels in self._scale_slices():
            out.append(sum(self.codebooks[j][codes[:, j]] for j in levels))
        return out

    def forward(self, x: torch.Tensor, *, levels: bool = False):
        """``(x_hat, codes, losses)``; with ``levels``, ``x_hat`` is the list of every
        level's reconstruction (``prefixes()``), coarse to fine, the last being the full one."""
        z = self.encoder(x)
        codes, quantized, losses = self.quantize(z, training=self.training)
        straight = z if self.training else None
        if not levels:
            return self.decode_latent(self.latent(quantized, z=straight)), codes, losses
        return ([self.decode_latent(self.latent(quantized, cols, z=straight))
                 for cols in self.prefixes()], codes, losses)

    def orthogonality(self) -> torch.Tensor:
        """Mean squared cosine between codewords of different scales."""
        books = [F.normalize(torch.cat([self.codebooks[j] for j in levels]), dim=1)
                 for levels in self._scale_slices()]
        total, pairs = books[0].new_zeros(()), 0
        for a in range(len(books)):
            for b in range(a + 1, len(books)):
                total = total + (books[a] @ books[b].T).pow(2).mean()
                pairs += 1
        return total / max(pairs, 1)


def order_loss(x: torch.Tensor, x_hat: torch.Tensor, temperature: float,
               n_queries: int | None = None) -> torch.Tensor:
    """Listwise partial-order loss over in-batch cosine similarities.

    For each query item i (the first ``n_queries`` rows of the batch),
    KL(softmax_j(cos(x_i, x_j)/t) || softmax_j(cos(x^_i, x^_j)/t)) over the other items
    j != i: the neighbours that matter most (the top of the list) dominate, as in recall@k.
    """
    xs, xh = F.normalize(x, dim=1), F.normalize(x_hat, dim=1)
    q = min(n_queries or len(x), len(x))
    eye = torch.eye(q, len(x), dtype=torch.bool, device=x.device)
    target = (xs[:q] @ xs.T / temperature).masked_fill(eye, -1e9)  # (Q, B)
    pred = (xh[:q] @ xh.T / temperature).masked_fill(eye, -1e9)
    return F.kl_div(F.log_softmax(pred, 1), F.log_softmax(target, 1), log_target=True,
                    reduction="batchmean")


class MmDictQuantizer:
    """``fit / encode / decode / save / load`` around ``MultiScaleResidualQuantizer``.

    Example::

        q = MmDictQuantizer(MmDictConfig(scale_sizes=[16, 64, 256]))
        codes = q.fit(x).encode(x)      # (n, 6) int64: code_s_0, code_s_1, ..., code_l_1
        x_hat = q.decode(codes)         # (n, d) float32
    """

    kind = "mmdict"

    def __init__(self, config: MmDictConfig | None = None) -> None:
        self.config = config or MmDictConfig()
        cfg = self.config
        self.code_names, self.codebook_sizes = scale_code_layout(cfg.scale_sizes, cfg.levels)
        self.net: MultiScaleResidualQuantizer | None = None
        self.history: list[dict] = []
        # What the fit saw (quantizer.base.fit_record), saved in quantizer.json.
        self.fit_info: dict | None = None
        # How the last fit went (steps, best step, share of codes moved from the start).
        self.training_summary: dict | None = None
        self._tables: tuple[tuple, object] | None = None  # (weights' identity, encode tables)
        self._aligned_axes: torch.Tensor | None = None  # the task-aware encoder, when fitting

    @property
    def dim(self) -> int | None:
        return self.net.dim if self.net is not None else None

    # ------------------------------------------------------------------ training

    def _init_from_data(self, x: torch.Tensor) -> None:
        """PCA-axes encoder/decoder and faiss' codebooks (residual quantizer, or k-means
        per level for parallel scales) on the latent."""
        import faiss

        net, cfg = self.net, self.config
        mean = x.mean(0)
        centered = x - mean
        # principal axes: the latent keeps the most variance the width allows
        axes = self._aligned_axes if self._aligned_axes is not None \
            else self._principal_axes(x)  # (latent, d)
        with torch.no_grad():
            net.encoder.weight.copy_(axes)
            net.encoder.bias.copy_(-(mean @ axes.T))
            z = net.encoder(x)
            # a cascade starts from faiss' residual quantizer trainer (beam search), which
            # generalises better than greedy per-level k-means (power-of-two sizes only)
            books = self._start_codebooks(x, z, mean, axes) if cfg.mode == "cascade" else None
            residual = z.clone()
            for s, levels in enumerate(net._scale_slices()):
                if cfg.mode == "parallel":
                    residual = z.clone()
                for j in levels:
                    if books is not None:
                        book = torch.from_numpy(books[j])
                    else:
                        km = faiss.Kmeans(net.latent_dim, len(net.codebooks[j]), niter=20,
                                          seed=cfg.seed + j, min_points_per_centroid=1,
                                          max_points_per_centroid=256)
                        km.train(np.ascontiguousarray(residual.numpy()))
                        book = torch.from_numpy(km.centroids)
                    net.codebooks[j].copy_(book)
                    residual = residual - book[nearest_code(residual, book)]
            decoder_w = torch.linalg.pinv(axes) if self._aligned_axes is not None \
                else axes.T  # (d, latent)
            if cfg.mode == "parallel":
                decoder_w = torch.cat([decoder_w / len(cfg.scale_sizes)] * len(cfg.scale_sizes), 1)
            net.decoder.weight.copy_(decoder_w)
            net.decoder.bias.copy_(mean)

    def _start_codes(self, x: torch.Tensor, axes: torch.Tensor | None
                     ) -> tuple[torch.Tensor, list[list[int]]]:
        """The codes of ``x``'s rows under the fit's start (faiss' or k-means' codebooks,
        no refinement) on the encoder ``axes`` (None: the content's own), and the code
        columns a ranker reads them by; what a task-aware encoder is judged on."""
        kept = self.net, self._aligned_axes
        try:
            torch.manual_seed(self.config.seed)
            self.net = MultiScaleResidualQuantizer(x.shape[1], self.config)
            self._aligned_axes = axes
            with single_threaded(), torch.no_grad():
                self._init_from_data(x)
                return self.net.search_codes(self.net.encoder(x)), self.net.id_groups()
        finally:
            self.net, self._aligned_axes = kept

    def _start_codebooks(self, x: torch.Tensor, z: torch.Tensor, mean: torch.Tensor,
                         axes: torch.Tensor) -> list[np.ndarray] | None:
        """faiss' residual quantizer codebooks, in the latent, for a cascade's start.

        A content-only encoder is ``z = (x - mean) @ axes.T``, so faiss is trained where
        the ``faiss_rq`` baseline is, on the input rows themselves, and its codebooks are
        mapped through that map (the first level's less the mean). With a full-width
        latent the start is then the baseline's own codes: whatever the refinement and
        the gradient steps keep is measured against faiss RQ, not against another faiss
        fit on rotated rows, which on small data scores differently. A task-aligned
        encoder re-weights the latent on purpose, so faiss is trained in it instead."""
        if self._aligned_axes is not None:
            return train_rq_codebooks(z.numpy(), self.codebook_sizes)
        books = train_rq_codebooks(x.numpy(), self.codebook_sizes)
        if books is None:
            return None
        mapped = [torch.from_numpy(book) @ axes.T for book in books]
        mapped[0] = mapped[0] - mean @ axes.T
        return [book.numpy() for book in mapped]

    def _principal_axes(self, x: torch.Tensor) -> torch.Tensor:
        """(latent, d): the principal axes of ``x``, the content-only encoder."""
        latent = self.net.latent_dim if self.net is not None \
            else min(self.config.latent_dim or x.shape[1], x.shape[1])
        centered = x - x.mean(0)
        _, _, vt = torch.linalg.svd(centered[: min(len(x), 50_000)], full_matrices=False)
        axes = vt[:latent]
        if axes.shape[0] < latent:  # latent wider than the data's rank
            extra = torch.randn(latent - axes.shape[0], x.shape[1]) * 1e-3
            axes = torch.cat([axes, extra])
        return axes

    @torch.no_grad()
    def _refine_codebooks(self, z: torch.Tensor, z_valid: torch.Tensor | None,
                          iterations: int, chunk_rows: int = 8192) -> int:
        """Moves every codebook of a chain to fit the chain's errors jointly: alternates the
        beam search's codes with a least-squares solve of all the chain's codewords for
        the fit's reconstruction objective, the full code's error plus ``level_weight``
        times the mean of the coarser prefixes' (``sum_j<=m C_j[code_j]`` for each level
        m), with a ridge ``refine_ridge`` towards the current codewords, so a rarely hit
        code moves little. The residual trainer fits each level to what the earlier
        levels left, greedily; this lets the levels share the work while each prefix
        still rebuilds the item on its own.

        With ``z_valid``, stops at the first iteration that does not lower that objective
        on the held-out rows and keeps the best codebooks; returns the iterations kept."""
        net, cfg = self.net, self.config
        chains = ([list(range(net.n_codes))] if cfg.mode == "cascade"
                  else [list(r) for r in net._scale_slices()])
        # weight of each prefix length 1..L of a chain in the objective
        def prefix_weights(length: int) -> list[float]:
            coarse = cfg.level_weight / (length - 1) if length > 1 else 0.0
            return [coarse] * (length - 1) + [1.0]

        def objective(x: torch.Tensor) -> float:
            codes = net.search_codes(x)
            total = 0.0
            for chain in chains:
                partial = torch.zeros_like(x)
                for j, w in zip(chain, prefix_weights(len(chain))):
                    partial = partial + net.codebooks[j][codes[:, j]]
                    total += w * float((x - partial).pow(2).sum())
            return total

        best = (objective(z_valid), 0, [b.detach().clone() for b in net.codebooks]) \
            if z_valid is not None else None
        for it in range(1, iterations + 1):
            gram, moment = {}, {}
            for start in range(0, len(z), chunk_rows):
                zc = z[start:start + chunk_rows]
                codes = net.search_codes(zc)
                for c, chain in enumerate(chains):
                    sizes = [len(net.codebooks[j]) for j in chain]
                    offsets = torch.tensor([0, *np.cumsum(sizes)[:-1].tolist()])
                    onehot = torch.zeros(len(zc), sum(sizes), dtype=torch.float64)
                    onehot.scatter_(1, codes[:, chain] + offsets, 1.0)
                    gram[c] = gram.get(c, 0) + onehot.T @ onehot
                    moment[c] = moment.get(c, 0) + onehot.T @ zc.double()
            for c, chain in enumerate(chains):
                # prefix m's normal equations are the top-left block (levels <= m) of the
                # full code's: weight each entry by the prefixes that contain its levels
                level = torch.cat([torch.full((len(net.codebooks[j]),), i)
                                   for i, j in enumerate(chain)])
                reach = torch.tensor(prefix_weights(len(chain)), dtype=torch.float64) \
                    .flip(0).cumsum(0).flip(0)  # sum of the weights of prefixes >= level
                weight = reach[torch.maximum(level[:, None], level[None, :])]
                current = torch.cat([net.codebooks[j] for j in chain]).double()
                ridge = cfg.refine_ridge * torch.eye(len(current), dtype=torch.float64)
                solved = torch.linalg.solve(gram[c] * weight + ridge,
                                            moment[c] * reach[level][:, None]
                                            + cfg.refine_ridge * current)
                for j, part in zip(chain, torch.split(solved.float(), [len(net.codebooks[j])
                                                                       for j in chain])):
                    net.codebooks[j].copy_(part)
            if best is not None:
                score = objective(z_valid)
                if score >= best[0] * (1 - 1e-4):
                    break
                best = (score, it, [b.detach().clone() for b in net.codebooks])
        if best is None:
            return iterations
        for book, kept in zip(net.codebooks, best[2]):
            book.copy_(kept)
        return best[1]

    def fit(self, x: np.ndarray, *, progress: bool = False,
            engagement: Engagement | None = None) -> "MmDictQuantizer":
        """x: (n, d) float32, at least ``max(scale_sizes)`` rows. ``progress``: a bar per step.
        ``engagement``: the training period's events on the rows of ``x``
        (``Engagement.from_events``), needed when ``task_signal`` is set: the encoder is
        aligned with it first (``quantizer.task_aware``), on the rows and events alone.

        The step count is found, not set: ``validation_fraction`` of the rows are held
        out, the network is scored on them every ``validate_every`` steps, and training
        stops after ``patience`` scores without a better one. The network is then trained
        again from its initialisation on all rows for the best score's number of steps
        (none: the initialisation is kept). ``training_summary`` says what happened,
        including the share of the held-out rows whose codes moved from the initial ones.
        """
        x_np = check_input(x)
        cfg = self.config
        if len(x_np) < max(cfg.scale_sizes):
            raise ValueError(f"a codebook of {max(cfg.scale_sizes)} codes needs at least that "
                             f"many training rows, got {len(x_np)}")
        if (cfg.task_signal is None) != (engagement is None):
            raise ValueError("task-aware tokens need both task_signal and the training events' "
                             "engagement" if cfg.task_signal else
                             "engagement given, but task_signal is None: set task_signal "
                             f"to one of {list(TASK_SIGNALS)} to align with it")
        self.fit_info = fit_record(x_np)
        x_all = torch.from_numpy(x_np)
        alignment = None
        self._aligned_axes = None
        data_seed = int(self.fit_info["input_sha256"][:15], 16)
        align_config = AlignmentConfig(signal=cfg.task_signal or TASK_SIGNALS[0],
                                       max_steps=cfg.task_steps,
                                       validate_every=cfg.validate_every,
                                       patience=cfg.patience, seed=cfg.seed)
        if engagement is not None:
            if len(engagement) and int(engagement.rows.max()) >= len(x_np):
                raise ValueError(f"engagement names row {int(engagement.rows.max())}, but x has "
                                 f"{len(x_np)} rows")
            self.fit_info["engagement_sha256"] = engagement.sha256()
            self.fit_info["engagement_events"] = len(engagement)
            with single_threaded():  # the same encoder, and codes, on any thread count
                torch.manual_seed(cfg.seed)
                axes = self._principal_axes(x_all)
                self._aligned_axes, click_model, alignment = align_encoder(
                    x_all, axes, engagement, align_config, data_seed=data_seed,
                    progress=progress, cut_codes=lambda a: self._start_codes(x_all, a))
                if not alignment["kept"]:  # nothing generalised: the content's own
                    self._aligned_axes = None  # encoder, bit for bit (no rescaling drift)
        generator = torch.Generator().manual_seed(cfg.seed)
        n_valid = min(int(len(x_np) * cfg.validation_fraction), cfg.validation_max_rows)
        if len(x_np) - n_valid < max(cfg.scale_sizes) or n_valid < 32:
            n_valid = 0  # too few rows to spare: train on all for the most steps
        # The held-out rows follow from the data, not the seed: the stopping rule's
        # counts, and so the IDs, do not move with the seed where no gradient step helps.
        by_data = torch.Generator().manual_seed(data_seed)
        split = torch.randperm(len(x_np), generator=by_data)
        x_valid, x_train = x_all[split[:n_valid]], x_all[split[n_valid:]]
        self.history = []
        found = self._train(x_train, x_valid if n_valid else None, cfg.steps, generator,
                            progress=progress, refine_iterations=cfg.refine_iterations)
        summary = {"valid_rows": n_valid, "refine_iterations": found["refine_iterations"],
                   "steps_run": found["steps_run"],
                   "best_step": found["best_step"], "valid_loss_best": found["valid_loss_best"],
                   "valid_loss_init": found["valid_loss_init"]}
        if n_valid:  # now on all rows; the held-out rows show how far the codes moved
            initial_codes = self._train(x_all, None, found["best_step"], generator,
                                        progress=progress, probe=x_valid,
                                        refine_iterations=found["refine_iterations"]
                                        )["initial_codes"]
            with torch.no_grad():
                final_codes = self.net.eval()(x_valid)[1]
            moved = final_codes != initial_codes
            summary.update(codes_changed=float(moved.any(1).float().mean()),
                           codes_changed_per_level=moved.float().mean(0).tolist())
        if alignment is not None:
            summary["task_alignment"] = alignment
        if cfg.task_signal == "clicks":  # then end to end through the codes
            with single_threaded():
                summary["task_finetune"] = finetune_through_codes(
                    self.net, x_all, engagement, align_config, click_model,
                    data_seed=data_seed, progress=progress)
        self._aligned_axes = None
        self.training_summary = summary
        return self

    def _train(self, x_train: torch.Tensor, x_valid: torch.Tensor | None, steps: int,
               generator: torch.Generator, *, progress: bool, refine_iterations: int,
               probe: torch.Tensor | None = None) -> dict:
        """Initialises ``self.net`` from ``x_train`` and trains it for at most ``steps``
        steps; with ``x_valid``, stops on it and keeps the best-scoring step's weights.
        The codes of ``probe`` under the initial network (faiss' codebooks, before any
        refinement) are returned as ``initial_codes``."""
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.net = MultiScaleResidualQuantizer(x_train.shape[1], cfg)
        with single_threaded():  # the same codebooks, and codes, on any thread count
            self._init_from_data(x_train)
            with torch.no_grad():
                initial_codes = self.net.eval()(probe)[1] if probe is not None else None
                z_valid = self.net.encoder(x_valid) if x_valid is not None else None
                refined = self._refine_codebooks(self.net.encoder(x_train), z_valid,
                                                 refine_iterations)
        device = torch.device(cfg.device)
        net = self.net.to(device)
        data_var = x_train.var(0).sum().item() + 1e-12
        found = {"steps_run": 0, "best_step": 0, "valid_loss_best": None, "valid_loss_init": None,
                 "refine_iterations": refined}
        best_state, since_best = None, 0
        if probe is not None:
            found["initial_codes"] = initial_codes
        if x_valid is not None:
            x_valid = x_valid.to(device)
            loss0, _ = self._validation_loss(x_valid, data_var)
            found["valid_loss_init"] = found["valid_loss_best"] = loss0
            best_state = copy.deepcopy(net.state_dict())
        if steps == 0:
            net.eval()
            self.net = net.cpu()
            return found
        # A task-aligned encoder stays where the alignment put it: these steps' objective
        # (rebuilding the content) would pull it back towards the content's own axes.
        encoder = [] if self._aligned_axes is not None else list(net.encoder.parameters())
        slow = encoder + list(net.codebooks.parameters())
        skip = {id(p) for p in [*net.encoder.parameters(), *slow]}
        fast = [p for p in net.parameters() if id(p) not in skip]
        opt = torch.optim.Adam([{"params": slow, "lr": cfg.lr_codebooks},
                                {"params": fast, "lr": cfg.lr}])
        batch = min(cfg.batch_size, len(x_train))
        total = cfg.steps  # the schedule of the longest fit, whatever step it stops at
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))
        hits = [torch.zeros(len(b), dtype=torch.long) for b in net.codebooks]
        sums = {"recon": 0.0, "order": 0.0, "n": 0}
        order = torch.randperm(len(x_train), generator=generator)
        cursor = 0
        bar = tqdm(total=steps, desc="fit mmdict" + (" (finding steps)" if x_valid is not None
                                                      else ""),
                   unit="step", disable=not progress, mininterval=1.0)
        for step in range(1, steps + 1):
            net.train()
            if cursor + batch > len(order):
                order, cursor = torch.randperm(len(x_train), generator=generator), 0
            xb = x_train[order[cursor:cursor + batch]].to(device)
            cursor += batch
            x_levels, codes, aux = net(xb, levels=True)
            recon_levels = [(x_hat - xb).pow(2).sum(1).mean() / data_var for x_hat in x_levels]
            recon = recon_levels[-1]
            coarse = torch.stack(recon_levels[:-1]).mean() if len(recon_levels) > 1 else 0.0
            rank = order_loss(xb, x_levels[-1], cfg.rank_temperature, cfg.rank_queries)
            loss = recon + cfg.level_weight * coarse + cfg.rank_weight * rank \
                + aux["codebook"] + aux["commit"] - cfg.entropy_weight * aux["entropy"]
            if cfg.mode == "parallel" and cfg.ortho_weight:
                loss = loss + cfg.ortho_weight * net.orthogonality()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            found["steps_run"] = step
            for j in range(net.n_codes):
                hits[j] += torch.bincount(codes[:, j].cpu(), minlength=len(hits[j]))
            sums["recon"] += recon.item()
            sums["order"] += rank.item()
            sums["n"] += 1
            if step % cfg.restart_every == 0 or step == steps:
                restarted = self._restart_dead_codes(x_train, hits, generator)
                self.history.append({"step": step, "recon": sums["recon"] / sums["n"],
                                     "order": sums["order"] / sums["n"], "restarted": restarted})
                hits = [torch.zeros_like(h) for h in hits]
                sums = {"recon": 0.0, "order": 0.0, "n": 0}
            if x_valid is not None and (step % cfg.validate_every == 0 or step == steps):
                valid_loss, _ = self._validation_loss(x_valid, data_var)
                self.history.append({"step": step, "valid_loss": valid_loss})
                bar.set_postfix(valid=f"{valid_loss:.4f}", best=f"{found['valid_loss_best']:.4f}")
                if valid_loss < found["valid_loss_best"] * (1 - 1e-4):
                    found.update(best_step=step, valid_loss_best=valid_loss)
                    best_state, since_best = copy.deepcopy(net.state_dict()), 0
                else:
                    since_best += 1
                    if since_best >= cfg.patience:
                        break
        bar.close()
        if best_state is not None:
            net.load_state_dict(best_state)
        else:
            found["best_step"] = found["steps_run"]
        net.eval()
        self.net = net.cpu()
        return found

    @torch.no_grad()
    def _validation_loss(self, x_valid: torch.Tensor, data_var: float
                         ) -> tuple[float, torch.Tensor]:
        """The objective the fit stops on, on held-out rows: reconstruction of the full
        code plus the order loss; returns it and the rows' codes."""
        net, cfg = self.net.eval(), self.config
        x_hat, codes, _ = net(x_valid)
        recon = (x_hat - x_valid).pow(2).sum(1).mean() / data_var
        rank = order_loss(x_valid, x_hat, cfg.rank_temperature)
        return float(recon + cfg.rank_weight * rank), codes.cpu()

    @torch.no_grad()
    def _restart_dead_codes(self, x_all: torch.Tensor, hits: list[torch.Tensor],
                            generator: torch.Generator) -> int:
        """Re-seeds codes with too few hits from the residuals their level sees."""
        net, cfg = self.net, self.config
        dead = [torch.nonzero(h < cfg.dead_code_min_hits).flatten() for h in hits]
        if not any(len(d) for d in dead):
            return 0
        device = next(net.parameters()).device
        sample = x_all[torch.randperm(len(x_all), generator=generator)[:4096]].to(device)
        z = net.encoder(sample)
        residual = z
        restarted = 0
        for levels in net._scale_slices():
            if cfg.mode == "parallel":
                residual = z
            for j in levels:
                book = net.codebooks[j]
                if len(dead[j]):
                    pick = torch.randint(len(residual), (len(dead[j]),), generator=generator)
                    noise = 1e-3 * torch.randn(len(dead[j]), book.shape[1], generator=generator)
                    book.data[dead[j]] = residual[pick.to(device)] + noise.to(device)
                    restarted += len(dead[j])
                residual = residual - book[nearest_code(residual, book)]
        return restarted

    # ------------------------------------------------------------------ inference

    def _check_fitted(self) -> None:
        if self.net is None:
            raise RuntimeError("quantizer is not fitted: call fit(x) or load(dir) first")

    @torch.no_grad()
    def encode(self, x: np.ndarray, *, validate: bool = True) -> np.ndarray:
        """x: (n, d) float32 -> codes (n, J) int64, in batches of ``encode_batch_size``;
        ``validate=False`` trusts a caller that checked ``x`` at its boundary.

        Beam 1 runs the fused multi-scale encode op (``kernels.multiscale_encode``: the
        Triton kernel on a GPU, the fast CPU path otherwise), the encoder's projection
        folded into the codebooks where that is cheaper; a wider beam runs
        ``search_codes`` in torch (the op's contract is greedy search).
        """
        self._check_fitted()
        x = check_input(x, self.dim) if validate else as_rows(x)
        net = self.net.eval()
        cfg = self.config
        out = np.empty((len(x), net.n_codes), dtype=np.int64)
        books = [[net.codebooks[j] for j in levels] for levels in net._scale_slices()]
        projection = (net.encoder.weight, net.encoder.bias)
        tables = None
        if cfg.beam_size == 1:  # built once per set of weights, not per request
            key = (id(net), *(p._version for p in net.parameters()))
            if self._tables is None or self._tables[0] != key:
                self._tables = (key, build_encode_tables(books, projection, cfg.mode))
            tables = self._tables[1]
        step = cfg.encode_batch_size
        for start in range(0, len(x), step):
            xb = torch.from_numpy(x[start:start + step])
            if tables is not None:
                codes = multiscale_encode(xb, books, projection=projection, mode=cfg.mode,
                                          tables=tables)
            else:
                codes = net.search_codes(net.encoder(xb))
            out[start:start + len(xb)] = codes.numpy()
        return out

    @torch.no_grad()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes: (n, J) int64 -> (n, d) float32 reconstructions."""
        self._check_fitted()
        codes = check_codes(codes, self.codebook_sizes)
        net = self.net.eval()
        out = np.empty((len(codes), net.dim), dtype=np.float32)
        step = self.config.encode_batch_size
        for start in range(0, len(codes), step):
            c = torch.from_numpy(codes[start:start + step])
            out[start:start + len(c)] = net.decode_latent(net.codewords(c)).numpy()
        return out

    @torch.no_grad()
    def decode_codewords(self, codes: np.ndarray) -> np.ndarray:
        """codes (n, J) -> (n, d): the sum of the codewords mapped back through the
        encoder's pseudo-inverse, no learned decoder - what the IDs themselves carry.
        Parallel scales, each a reconstruction of the whole latent, are averaged."""
        self._check_fitted()
        codes = check_codes(codes, self.codebook_sizes)
        net = self.net.eval()
        scales = net.codewords(torch.from_numpy(codes))
        zq = torch.stack(scales, 0).sum(0) if self.config.mode == "cascade" \
            else torch.stack(scales, 0).mean(0)
        back = torch.linalg.pinv(net.encoder.weight.double())  # (d, latent)
        return ((zq.double() - net.encoder.bias.double()) @ back.T).float().numpy()

    def save(self, directory: str | Path) -> Path:
        self._check_fitted()
        directory = write_quantizer_meta(directory, {
            "kind": self.kind, "dim": self.net.dim, "config": asdict(self.config),
            "fit": self.fit_info, "training": self.training_summary,
            "history": self.history})
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(directory / "weights.safetensors"))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "MmDictQuantizer":
        meta = read_quantizer_meta(directory, cls.kind)
        quantizer = cls(MmDictConfig(**meta["config"]))
        quantizer.net = MultiScaleResidualQuantizer(int(meta["dim"]), quantizer.config)
        quantizer.net.load_state_dict(load_file(str(Path(directory) / "weights.safetensors")))
        quantizer.net.eval()
        quantizer.history = meta.get("history", [])
        quantizer.fit_info = meta.get("fit")
        quantizer.training_summary = meta.get("training")
        return quantizer
