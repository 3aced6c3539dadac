"""Conditional residual quantization: each step's codebook adapts to the codes before it.

Implements the method of QINCo (Huijben et al., "Residual Quantization with Implicit
Neural Codebooks", ICML 2024) with QINCo2's candidate pre-selection and beam search
(Vallaeys et al., ICLR 2025), from the papers' descriptions:

* Step m has a base codebook ``b_m`` (K_m, d) and, for m >= 1, a small residual MLP
  ``f_m``. Given the partial reconstruction ``x̂_{m-1}``, candidate i's codeword is
  ``c_m(i) = b_m(i) + f_m([b_m(i), x̂_{m-1}])`` and ``x̂_m = x̂_{m-1} + c_m(i_m)``.
  Step 0 sees an empty prefix (``x̂_0 = 0``), so it is a plain codebook.
* ``f_m`` is one hidden layer: ``W_out relu(W_code b + W_prefix x̂ + bias)``. Its first
  layer is linear in the concatenation, so ``W_code b_m`` is formed once per codebook
  and only ``W_prefix x̂`` once per beam entry; ``W_out`` starts at zero, so an
  untrained network is exactly faiss' residual quantizer it was initialised from.
* **Encode**: beam search over partial code tuples. Per beam entry, the K base codewords
  are ranked by their distance to the current residual (cheap) and the MLP runs on the
  best ``candidates`` (A) only; the ``beam_size`` tuples of least error survive.
* **Fit**: base codebooks from faiss' ``ResidualQuantizer`` (beam 5). Each Adam step
  encodes a batch with the current network (no gradient), then minimises
  ``sum_m ||x - x̂_m||^2`` (every step its own reconstruction loss) w.r.t. codebooks and
  MLPs. A held-out tenth of the fit rows is encoded every ``validate_every`` steps and
  the step of least validation error is kept (step 0, faiss RQ's solution, included),
  so the fit can only move away from RQ where that helps on unseen rows.

Example::

    q = ConditionalRQQuantizer(ConditionalRQConfig(seed=0)).fit(x)   # x: (n, d) float32
    codes = q.encode(x)                                               # (n, 6) int64
    x_hat = q.decode(codes)                                           # (n, d) float32
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from quantizer.base import (as_rows, check_codes, check_input, fit_record, read_quantizer_meta,
                            scale_code_layout, single_threaded, write_quantizer_meta)
from quantizer.baselines import train_rq_codebooks


@dataclass
class ConditionalRQConfig:
    # Codebook size per scale, coarse to fine (the MmDict layout: scales x levels).
    scale_sizes: list[int] = field(default_factory=lambda: [16, 64, 256])
    # Levels per scale; the steps run scale by scale, level by level: one residual chain.
    levels: int = 2
    # Hidden width of each step's codebook-adapting MLP.
    hidden: int = 128
    # Partial code tuples kept per row while encoding (1 = greedy).
    beam_size: int = 5
    # Base codewords per beam entry that the MLP evaluates (QINCo2's pre-selection A).
    candidates: int = 8
    # Beam width used to find each training batch's codes (smaller is cheaper).
    train_beam_size: int = 1
    # Adam steps at most; the kept weights are those of the best validation score.
    steps: int = 200
    batch_size: int = 1024
    # Learning rate of the MLPs, and of the base codebooks (which start at faiss RQ's).
    lr: float = 1e-3
    lr_codebooks: float = 1e-4
    # Share of the fit rows held out (at most validation_max_rows) to score the network
    # every validate_every steps; training stops after `patience` scores without a new best.
    validation_fraction: float = 0.1
    validation_max_rows: int = 2048
    validate_every: int = 25
    patience: int = 4
    # Rows per encode batch (memory: rows x beam x candidates x (d + hidden) floats).
    encode_batch_size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        scale_code_layout(self.scale_sizes, self.levels)
        if min(self.hidden, self.beam_size, self.candidates, self.train_beam_size,
               self.steps, self.batch_size, self.validate_every, self.patience,
               self.encode_batch_size) < 1:
            raise ValueError("hidden, beam sizes, candidates, steps, batch sizes, "
                             "validate_every and patience must be >= 1")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got "
                             f"{self.validation_fraction}")


class ConditionalCodebooks(nn.Module):
    """Base codebooks and the per-step MLPs that adapt them to the prefix.

    Args:
        dim: embedding width d.
        codebook_sizes: K_m per step.
        hidden: MLP hidden width h.
    """

    def __init__(self, dim: int, codebook_sizes: list[int], hidden: int) -> None:
        super().__init__()
        self.dim = dim
        self.codebooks = nn.ParameterList([nn.Parameter(torch.zeros(k, dim))
                                           for k in codebook_sizes])
        # Step 0 has no prefix: its MLP would only re-parametrise its codebook.
        self.code_in = nn.ModuleList([nn.Linear(dim, hidden) for _ in codebook_sizes[1:]])
        self.prefix_in = nn.ModuleList([nn.Linear(dim, hidden, bias=False)
                                        for _ in codebook_sizes[1:]])
        self.out = nn.ModuleList([nn.Linear(hidden, dim) for _ in codebook_sizes[1:]])
        for layer in self.out:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def n_steps(self) -> int:
        return len(self.codebooks)

    def codewords(self, m: int, codes: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Step m's codewords for ``codes`` (n,) after reconstructions ``prefix`` (n, d)."""
        base = self.codebooks[m][codes]  # (n, d)
        if m == 0:
            return base
        hidden = torch.relu(self.code_in[m - 1](base) + self.prefix_in[m - 1](prefix))
        return base + self.out[m - 1](hidden)

    def decode(self, codes: torch.Tensor, *, every_step: bool = False
               ) -> torch.Tensor | list[torch.Tensor]:
        """codes (n, M) -> x̂_M (n, d); with ``every_step``, the list [x̂_1 .. x̂_M]."""
        x_hat = torch.zeros(len(codes), self.dim, dtype=self.codebooks[0].dtype,
                            device=codes.device)
        steps = []
        for m in range(self.n_steps):
            x_hat = x_hat + self.codewords(m, codes[:, m], x_hat)
            steps.append(x_hat)
        return steps if every_step else x_hat

    @torch.no_grad()
    def search(self, x: torch.Tensor, beam_size: int, candidates: int) -> torch.Tensor:
        """Codes (n, M) of rows x (n, d) by beam search with candidate pre-selection.

        Per beam entry, the A = ``candidates`` base codewords nearest the residual r are
        adapted by the MLP and scored by the error they leave; of the B x A extensions
        of the B entries, the ``beam_size`` of least error are kept. Returns the best.

        The error of codeword ``b + W h + c`` (h: the MLP's hidden activation) is formed
        in the hidden width rather than in d, so only the kept codewords are built:
        ``||r - b - Wh - c||^2 = ||r - b||^2 - 2 r.c + 2 b.c + ||c||^2
        + h.(W'W h - 2 W'r + 2 W'b + 2 W'c)``.
        """
        n, d = x.shape
        row = torch.arange(n, device=x.device)[:, None]  # (n, 1)
        x_hat = x.new_zeros(n, 1, d)  # (n, B, d), B = 1 at the start
        codes = torch.empty(n, 1, 0, dtype=torch.long, device=x.device)
        for m in range(self.n_steps):
            book = self.codebooks[m]
            k, width = len(book), x_hat.shape[1]
            residual = x[:, None, :] - x_hat  # (n, B, d)
            base = (residual @ book.T).mul_(-2.0).add_(book.pow(2).sum(1))  # (n, B, K)
            base.add_(residual.pow(2).sum(-1, keepdim=True))  # ||r - b||^2, comparable across beams
            a = min(candidates, k)
            err, cand = base.topk(a, dim=2, largest=False, sorted=True)  # (n, B, A)
            if m > 0:
                w, c = self.out[m - 1].weight, self.out[m - 1].bias  # (d, h), (d,)
                hidden = torch.relu(self.code_in[m - 1](book)[cand]
                                    + self.prefix_in[m - 1](x_hat)[:, :, None, :])  # (n, B, A, h)
                per_code = 2.0 * (book @ w)  # (K, h)
                per_beam = 2.0 * (c @ w) - 2.0 * (residual @ w)  # (n, B, h)
                linear = per_code[cand] + per_beam[:, :, None, :]  # (n, B, A, h)
                err = err + (2.0 * (book @ c))[cand] + (c @ c - 2.0 * (residual @ c))[:, :, None]
                err = err + (hidden * (hidden @ (w.T @ w) + linear)).sum(-1)
            keep = min(beam_size, width * a)
            best = err.reshape(n, -1).topk(keep, dim=1, largest=False, sorted=True).indices
            parent, slot = best // a, best % a  # (n, keep)
            chosen = cand[row, parent, slot]  # (n, keep)
            prefix = x_hat[row, parent]  # (n, keep, d)
            words = self.codewords(m, chosen.reshape(-1), prefix.reshape(-1, d))
            x_hat = prefix + words.view(n, keep, d)
            codes = torch.cat([codes[row, parent], chosen[..., None]], dim=2)
        return codes[:, 0]


class ConditionalRQQuantizer:
    """QINCo-style conditional residual quantizer (ICML 2024; QINCo2, ICLR 2025) behind
    the ``Quantizer`` interface, in MmDict's (scales x levels) code layout.

    Args:
        config: see ``ConditionalRQConfig``.
    """

    kind = "conditional_rq"

    def __init__(self, config: ConditionalRQConfig | None = None) -> None:
        self.config = config or ConditionalRQConfig()
        self.code_names, self.codebook_sizes = scale_code_layout(self.config.scale_sizes,
                                                                 self.config.levels)
        self.net: ConditionalCodebooks | None = None
        self.fit_info: dict | None = None
        self.training_summary: dict | None = None
        self.history: list[dict] = []

    @property
    def dim(self) -> int | None:
        return None if self.net is None else self.net.dim

    def _faiss_rq_init(self, x: torch.Tensor) -> None:
        """Base codebooks from faiss' residual quantizer trainer (beam 5)."""
        books = train_rq_codebooks(x.numpy(), self.codebook_sizes)
        if books is None:
            raise ValueError(f"faiss' residual quantizer needs power-of-two codebook sizes, "
                             f"got {self.codebook_sizes}")
        with torch.no_grad():
            for book, init in zip(self.net.codebooks, books):
                book.copy_(torch.from_numpy(init))

    def fit(self, x: np.ndarray, *, progress: bool = False) -> "ConditionalRQQuantizer":
        """x: (n, d) float32, at least ``max(scale_sizes)`` rows. ``progress``: a bar."""
        x_np = check_input(x)
        cfg = self.config
        if len(x_np) < max(cfg.scale_sizes):
            raise ValueError(f"a codebook of {max(cfg.scale_sizes)} codes needs at least that "
                             f"many training rows, got {len(x_np)}")
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        x_all = torch.from_numpy(x_np)
        n_valid = min(int(len(x_np) * cfg.validation_fraction), cfg.validation_max_rows)
        if len(x_np) - n_valid < max(cfg.scale_sizes) or n_valid < 32:
            n_valid = 0  # too few rows to spare: train on all, keep the last step
        split = torch.randperm(len(x_np), generator=generator)
        x_valid, x_train = x_all[split[:n_valid]], x_all[split[n_valid:]]
        self.net = net = ConditionalCodebooks(x_np.shape[1], self.codebook_sizes, cfg.hidden)
        self.fit_info = fit_record(x_np)
        with single_threaded():  # the same codebooks, and codes, on any thread count
            self._faiss_rq_init(x_train)
        data_var = x_train.var(0).sum().item() + 1e-12
        books = list(net.codebooks.parameters())
        book_ids = {id(p) for p in books}
        mlps = [p for p in net.parameters() if id(p) not in book_ids]
        opt = torch.optim.Adam([{"params": books, "lr": cfg.lr_codebooks},
                                {"params": mlps, "lr": cfg.lr}])
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, cfg.steps) / cfg.steps)))
        batch = min(cfg.batch_size, len(x_train))
        self.history = []
        best = {"step": 0, "mse": math.inf, "state": None}
        if n_valid:
            best["mse"] = self._relative_mse(x_valid, data_var)
            best["state"] = copy.deepcopy(net.state_dict())
            self.history.append({"step": 0, "valid_rel_mse": best["mse"]})
        since_best, cursor, step, loss_sum, loss_n = 0, 0, 0, 0.0, 0
        order = torch.randperm(len(x_train), generator=generator)
        bar = tqdm(total=cfg.steps, desc="fit conditional_rq", unit="step",
                   disable=not progress, mininterval=1.0)
        for step in range(1, cfg.steps + 1):
            if cursor + batch > len(order):
                order, cursor = torch.randperm(len(x_train), generator=generator), 0
            xb = x_train[order[cursor:cursor + batch]]
            cursor += batch
            codes = net.search(xb, cfg.train_beam_size, cfg.candidates)
            x_steps = net.decode(codes, every_step=True)
            loss = sum((xb - x_hat).pow(2).sum(1).mean() for x_hat in x_steps) / data_var
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            if n_valid and (step % cfg.validate_every == 0 or step == cfg.steps):
                mse = self._relative_mse(x_valid, data_var)
                self.history.append({"step": step, "train_loss": loss_sum / loss_n,
                                     "valid_rel_mse": mse})
                loss_sum, loss_n = 0.0, 0
                bar.set_postfix(valid=f"{mse:.4f}", best=f"{best['mse']:.4f}")
                if mse < best["mse"] * (1 - 1e-4):
                    best, since_best = {"step": step, "mse": mse,
                                        "state": copy.deepcopy(net.state_dict())}, 0
                else:
                    since_best += 1
                    if since_best >= cfg.patience:
                        break
        bar.close()
        if best["state"] is not None:
            net.load_state_dict(best["state"])
        net.eval()
        self.training_summary = {
            "steps_run": step, "best_step": best["step"] if n_valid else step,
            "valid_rows": n_valid,
            "valid_rel_mse_rq_start": self.history[0]["valid_rel_mse"] if n_valid else None,
            "valid_rel_mse_best": best["mse"] if n_valid else None,
        }
        return self

    @torch.no_grad()
    def _relative_mse(self, x: torch.Tensor, data_var: float) -> float:
        """Mean squared error of the full code over the data variance (``encode``'s search)."""
        cfg = self.config
        err = 0.0
        for start in range(0, len(x), cfg.encode_batch_size):
            xb = x[start:start + cfg.encode_batch_size]
            codes = self.net.search(xb, cfg.beam_size, cfg.candidates)
            err += (xb - self.net.decode(codes)).pow(2).sum().item()
        return err / len(x) / data_var

    # ------------------------------------------------------------------ inference

    def _check_fitted(self) -> None:
        if self.net is None:
            raise RuntimeError("conditional_rq quantizer is not fitted: call fit(x) or "
                               "load(dir) first")

    @torch.no_grad()
    def encode(self, x: np.ndarray, *, validate: bool = True) -> np.ndarray:
        """x: (n, d) float32 -> codes (n, M) int64, in batches of ``encode_batch_size``;
        ``validate=False`` trusts a caller that checked ``x`` at its boundary."""
        self._check_fitted()
        x = check_input(x, self.dim) if validate else as_rows(x)
        cfg = self.config
        out = np.empty((len(x), len(self.codebook_sizes)), dtype=np.int64)
        for start in range(0, len(x), cfg.encode_batch_size):
            xb = torch.from_numpy(x[start:start + cfg.encode_batch_size])
            out[start:start + len(xb)] = self.net.search(xb, cfg.beam_size, cfg.candidates).numpy()
        return out

    @torch.no_grad()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes: (n, M) int64 -> (n, d) float32 reconstructions."""
        self._check_fitted()
        codes = check_codes(codes, self.codebook_sizes)
        out = np.empty((len(codes), self.net.dim), dtype=np.float32)
        step = self.config.encode_batch_size
        for start in range(0, len(codes), step):
            chunk = torch.from_numpy(codes[start:start + step])
            out[start:start + step] = self.net.decode(chunk).numpy()
        return out

    def save(self, directory: str | Path) -> Path:
        self._check_fitted()
        directory = write_quantizer_meta(directory, {
            "kind": self.kind, "dim": self.dim, "config": asdict(self.config),
            "fit": self.fit_info, "training": self.training_summary, "history": self.history})
        state = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(directory / "weights.safetensors"))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "ConditionalRQQuantizer":
        meta = read_quantizer_meta(directory, cls.kind)
        quantizer = cls(ConditionalRQConfig(**meta["config"]))
        quantizer.net = ConditionalCodebooks(int(meta["dim"]), quantizer.codebook_sizes,
                                             quantizer.config.hidden)
        quantizer.net.load_state_dict(load_file(str(Path(directory) / "weights.safetensors")))
        quantizer.net.eval()
        quantizer.fit_info, quantizer.training_summary = meta.get("fit"), meta.get("training")
        quantizer.history = meta.get("history", [])
        return quantizer
