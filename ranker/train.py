"""Training and evaluation of one ranker variant: one process, or many under
``torchrun`` with TorchRec's ``DistributedModelParallel`` (tables sharded across
ranks, gloo on CPU, nccl on GPU), with atomic checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm.auto import tqdm

from ranker.checkpoint import (CheckpointError, ShardedTensor, copy_into, flatten_state, latest_checkpoint,
                               load_checkpoint, prune_checkpoints, save_checkpoint,
                               unflatten_state)
from ranker.data import InMemoryBatches, ParquetBatches, Shard
from ranker.features import EncodedEvents, FeatureEncoder
from ranker.metrics import auc, paired_auc_difference
from ranker.model import TABLE_OPTIMIZERS, RankerConfig, RankingModel


@dataclass
class TrainResult:
    # The best validation's weights (restored), plain under one process.
    model: nn.Module
    # One dict per validation: epoch (fractional: 1.5 is half-way through the second),
    # step (global), train_loss (mean since the last validation), valid_auc.
    history: list[dict] = field(default_factory=list)
    # Where the restored weights come from, and their validation AUC.
    best_epoch: float = 0.0
    best_step: int = 0
    valid_auc: float = float("nan")
    train_examples_per_s: float = 0.0
    # True when the run continued from a checkpoint.
    resumed: bool = False
    # RankerConfig.table_reinit_on_plateau: the epoch from which the tables restarted
    # each epoch (None: patience never ran out, or the option is off).
    tables_restarted_from_epoch: int | None = None


def current_shard() -> Shard:
    """This process' rank and world size (0 of 1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


def ensure_process_group() -> None:
    """Training always runs under TorchRec's ``DistributedModelParallel``; a process
    not started by ``torchrun`` becomes a world of one (an in-process store, no
    network). That way one process and many run the same code and the same fused
    sparse optimizer, which updates only the table rows a batch touched."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def build_model(features: FeatureEncoder, config: RankerConfig
                ) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]:
    """``(model, sparse_optimizer, dense_optimizer)``: the ``RankingModel`` wrapped in
    ``DistributedModelParallel`` with a plan from TorchRec's planner (gloo on CPU, nccl
    on GPU). Table updates run fused into the backward pass on the rows a batch touched
    (``config.table_optimizer``: exact or row-wise Adagrad); the MLPs are data-parallel
    under Adam."""
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingType
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    ensure_process_group()
    torch.manual_seed(config.seed)
    # The seeded weights every rank starts from. The model DMP shards has its tables on
    # the meta device: the per-rank shards are allocated by TorchRec, and no full-size
    # table is left behind, held alive by the in-backward optimizer's hooks.
    initial = RankingModel.of(features, config).state_dict()
    model = RankingModel.of(features, config, table_device=torch.device("meta"))
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    # One optimizer for every table: tables with different fused parameters go into
    # separate fbgemm kernels, and in a profile a second kernel (row-wise for the content
    # tables only) cost more per step than the row-wise update saved.
    apply_optimizer_in_backward(TABLE_OPTIMIZERS[config.table_optimizer],
                                model.sparse_parameters(), {"lr": config.lr_sparse})
    topology = Topology(world_size=dist.get_world_size(), compute_device=device.type)
    # Every table table-wise with the fused kernel: the planner would make small tables
    # data-parallel, and those do not take the fused in-backward Adagrad step.
    constraints = {f"t_{name}": ParameterConstraints(
        sharding_types=[ShardingType.TABLE_WISE.value],
        compute_kernels=[EmbeddingComputeKernel.FUSED.value]) for name in features.sparse_names}
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(
        model, None, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=device, plan=plan)
    _load_unsharded(dmp, initial)
    dense_params = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
    dense_opt = torch.optim.Adam(dense_params, lr=config.lr_dense, weight_decay=config.weight_decay)
    return dmp, dmp.fused_optimizer, dense_opt


@torch.no_grad()
def _load_unsharded(dmp: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copies a plain model's weights into a DMP model, each rank its shards. The
    sharded tables draw their own initial rows per rank; this makes the start of
    training the seeded plain model's, whatever the number of processes."""
    for key, live in dmp.state_dict().items():
        value = state[key.removeprefix("module.")]
        if isinstance(live, ShardedTensor):
            for shard in live.local_shards():
                index = tuple(slice(o, o + n) for o, n in
                              zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
                shard.tensor.copy_(value[index])
        else:
            live.copy_(value)


@torch.no_grad()
def unshard_model(trained: nn.Module, features: FeatureEncoder, config: RankerConfig
                  ) -> RankingModel | None:
    """A plain ``RankingModel`` with the weights of a DMP model, for serving and export.
    Collective under several processes: every rank sends its table shards to rank 0,
    which gets the model; the other ranks get None."""
    rank = dist.get_rank()
    state = {}
    for key, value in trained.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=full)
            value = full
        if rank == 0:
            state[key.removeprefix("module.")] = value.detach().cpu().clone()
    if rank != 0:
        return None
    plain = RankingModel.of(features, config)
    plain.load_state_dict(state)
    return plain.eval()


@torch.no_grad()
def predict(model: nn.Module, features: FeatureEncoder, events: EncodedEvents,
            *, batch_size: int = 4096) -> np.ndarray:
    """Click probabilities, (N,) float64, in event order.

    In a process group every rank scores every ``world_size``-th event (padded so all
    ranks take the same steps) and the scores are gathered, so each rank returns all N.
    """
    was_training = model.training
    model.eval()
    shard = current_shard()
    n = len(events)
    rows = torch.arange(shard.rank, n, shard.world_size)
    per_rank = -(-n // shard.world_size)
    if len(rows) < per_rank:  # pad with a real row; its score is dropped below
        rows = torch.cat([rows, torch.zeros(per_rank - len(rows), dtype=torch.int64)])
    out = []
    for start in range(0, per_rank, batch_size):
        dense, kjt, _ = features.batch(events, rows[start:start + batch_size])
        out.append(torch.sigmoid(model(dense, kjt).float()).double())
    probs = torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
    if shard.world_size > 1:
        gathered = [torch.empty_like(probs) for _ in range(shard.world_size)]
        dist.all_gather(gathered, probs)
        probs = torch.stack(gathered, dim=1).reshape(-1)[:n]  # row r + k*W sits at k*W + r
    model.train(was_training)
    return probs.numpy()


def _model_state(model: nn.Module, tensors: dict, prefix: str) -> dict:
    return flatten_state(model.state_dict(), prefix, tensors)


def _restore_model(model: nn.Module, skeleton, tensors: dict, where: str) -> None:
    copy_into(model.state_dict(), unflatten_state(skeleton, tensors), where)


def _optimizer_state(opt: torch.optim.Optimizer, tensors: dict, prefix: str):
    return flatten_state(opt.state_dict(), prefix, tensors)


def _table_state(model: nn.Module) -> dict:
    """The model's sharded tables (each rank's shards), by state-dict key."""
    return {k: v for k, v in model.state_dict().items() if isinstance(v, ShardedTensor)}


def _restore_optimizer(opt: torch.optim.Optimizer, skeleton, tensors: dict, where: str) -> None:
    saved = unflatten_state(skeleton, tensors)
    if isinstance(opt, torch.optim.Adam):  # the MLPs' optimizer: plain state, plain load
        opt.load_state_dict(saved)
    else:  # TorchRec's fused optimizer: its state tensors are the live (sharded) buffers
        copy_into(opt.state_dict()["state"], saved["state"], where)


def validation_steps(n_batches: int, per_epoch: int) -> set[int]:
    """The steps (counted from 1 within an epoch of ``n_batches``) after which the model
    is validated: ``per_epoch`` evenly spaced ones, the last at the epoch's end."""
    return {-(-n_batches * (k + 1) // per_epoch) for k in range(min(per_epoch, n_batches))}


def snapshot_steps(checks: set[int], snapshots: int) -> set[int]:
    """The steps (counted from 1 within an epoch) whose weights enter the average a
    validation scores: ``snapshots`` evenly spaced ones in each window between two
    validation steps of ``checks``, the last at the validation itself."""
    steps, start = set(), 0
    for end in sorted(checks):
        width = end - start
        n = min(snapshots, width)
        steps |= {start + -(-width * (k + 1) // n) for k in range(n)}
        start = end
    return steps


class TailAverage:
    """``RankerConfig.averaged_snapshots``: a running sum of the model's weights at the
    snapshot steps of the current validation window, and the mean of them swapped in
    while a validation scores and keeps the model.

    The weights are the live tensors of the model's state dict (each sharded table's
    local shards, the MLPs' parameters). The sums are allocated at the first snapshot,
    so a run without averaging holds no second copy of its tables.
    """

    def __init__(self, model: nn.Module) -> None:
        self.live = _weight_tensors(model.state_dict())
        self.sums: list[torch.Tensor] = []
        self.count = 0

    @torch.no_grad()
    def add(self) -> None:
        if not self.sums:
            self.sums = [torch.zeros_like(t) for t in self.live]
        for total, weight in zip(self.sums, self.live):
            total.add_(weight)
        self.count += 1

    def reset(self) -> None:
        for total in self.sums:
            total.zero_()
        self.count = 0

    @contextlib.contextmanager
    def applied(self):
        """The model holds the mean of the window's snapshots inside the block (its own
        weights when none was taken), and its own weights again after it."""
        if self.count == 0:
            yield
            return
        own = [weight.clone() for weight in self.live]
        with torch.no_grad():
            for weight, total in zip(self.live, self.sums):
                torch.div(total, self.count, out=weight)
        try:
            yield
        finally:
            with torch.no_grad():
                for weight, saved in zip(self.live, own):
                    weight.copy_(saved)

    def to_checkpoint(self, tensors: dict[str, torch.Tensor]) -> int:
        """Puts the window's sums into a checkpoint's tensors; returns their count."""
        if self.count:
            tensors.update({f"avg/{i}": total for i, total in enumerate(self.sums)})
        return self.count

    def from_checkpoint(self, tensors: dict[str, torch.Tensor], count: int) -> None:
        if count == 0:
            return
        self.sums = [torch.zeros_like(t) for t in self.live]
        for i, total in enumerate(self.sums):
            copy_into(total, tensors[f"avg/{i}"], "tail average")
        self.count = count


def _weight_tensors(state: dict) -> list[torch.Tensor]:
    """The live floating-point tensors behind a model's state dict, in its order."""
    out = []
    for value in state.values():
        if isinstance(value, ShardedTensor):
            out.extend(shard.tensor for shard in value.local_shards())
        elif torch.is_tensor(value) and value.is_floating_point():
            out.append(value)
    return out


def table_learning_rate(config: RankerConfig, epoch: int) -> float:
    """The tables' Adagrad rate in ``epoch`` (from 0): 0 in the warm-up epochs (the
    fused kernel still adds each touched row's squared gradient to its Adagrad sum),
    then ``lr_sparse`` decayed per epoch."""
    if epoch < config.table_warmup_epochs:
        return 0.0
    return config.lr_sparse * config.lr_sparse_decay ** (epoch - config.table_warmup_epochs)


@dataclass
class FrequencyL2:
    """``RankerConfig.id_l2_frequency``: L2 on the id rows a batch looked up, each over
    its id's training count, so over an epoch every row gets about the same pull toward
    0 (a row seen n times is penalised n times at 1/n), where a plain L2 on the looked-up
    rows would shrink frequent ids most and leave the rare, memorising ones nearly free.

    Args:
        strength: id_l2_frequency.
        inverse_counts: feature name -> (rows,) float32 1 / training count of each row
            (0 for rows not regularised: the out-of-vocabulary rows, rows never seen).
        positions: feature name -> its slot in the model's (B, F, D) embeddings.
    """

    strength: float
    inverse_counts: dict[str, torch.Tensor]
    positions: dict[str, int]

    @classmethod
    def of(cls, features: FeatureEncoder, strength: float) -> "FrequencyL2 | None":
        """The regulariser over ``features``' one-id features (None when strength is 0)."""
        if strength <= 0:
            return None
        inverse = {}
        for name, counts in features.id_row_counts.items():
            counts = torch.from_numpy(np.asarray(counts, dtype=np.float32))
            inverse[name] = torch.where(counts > 0, 1 / counts.clamp(min=1), 0.0)
        return cls(strength, inverse, {name: features.sparse_names.index(name) for name in inverse})

    def penalty(self, kjt: KeyedJaggedTensor, embedded: torch.Tensor) -> torch.Tensor:
        """``strength`` x mean over the batch of sum_f ||row_f||^2 / count_f.

        Args:
            kjt: the batch's features (one id per example in the regularised ones).
            embedded: (B, F, D) pooled embeddings, F in ``sparse_names`` order.
        """
        total = embedded.new_zeros(())
        for name, inverse in self.inverse_counts.items():
            if inverse.device != embedded.device:  # once: the tables' device (GPU)
                self.inverse_counts[name] = inverse = inverse.to(embedded.device)
            weight = inverse[kjt[name].values()]  # (B,)
            total = total + (weight * embedded[:, self.positions[name]].pow(2).sum(-1)).sum()
        return self.strength * total / max(len(embedded), 1)


def train_step(model: nn.Module, sparse_opt: torch.optim.Optimizer,
               dense_opt: torch.optim.Optimizer, batch, id_l2: FrequencyL2 | None = None
               ) -> torch.Tensor:
    """One optimizer step on ``(dense, kjt, labels)``; returns the batch's BCE loss
    (without ``id_l2``'s penalty, which the step adds)."""
    dense, kjt, labels = batch
    if id_l2 is None:
        logits, penalty = model(dense, kjt), 0.0
    else:
        logits, embedded = model(dense, kjt, with_embeddings=True)
        penalty = id_l2.penalty(kjt, embedded)
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    sparse_opt.zero_grad()
    dense_opt.zero_grad()
    (loss + penalty).backward()
    sparse_opt.step()
    dense_opt.step()
    return loss


class _EndEpoch(Exception):
    """Raised by a validation to end the epoch early (table_reinit_on_plateau)."""


def train_ranker(features: FeatureEncoder, train: EncodedEvents | InMemoryBatches | ParquetBatches,
                 valid: EncodedEvents, config: RankerConfig, *, progress: bool = True,
                 desc: str = "train", checkpoint_dir: str | Path | None = None,
                 checkpoint_every: int = 0, resume: bool = False,
                 stop_after_steps: int | None = None) -> TrainResult:
    """Trains, validating ``config.validations_per_epoch`` times an epoch and stopping
    after ``config.patience`` validations without a better AUC; returns the model with
    the best validation's weights restored (a CTR model can peak mid-epoch, right after
    its ID tables start to learn, and over-fit before the epoch ends).

    Args:
        features: the fitted feature encoder.
        train: training events in memory, or a batch source (``ranker.data``).
        valid: validation events (in memory; every rank scores its share).
        config: architecture and optimisation.
        checkpoint_dir: where checkpoints go; one is written at every epoch end and
            every ``checkpoint_every`` steps (0: epoch ends only).
        resume: continue from the newest complete checkpoint in ``checkpoint_dir``;
            an error if there is none. Without it, an existing checkpoint is an error
            too (a run never silently starts over or overwrites another).
        stop_after_steps: end the run after this many optimizer steps (tests, smoke runs).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        return _train(features, train, valid, config, progress=progress, desc=desc,
                      checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                      resume=resume, stop_after_steps=stop_after_steps)
    finally:
        torch.set_num_threads(threads)


def _train(features, train, valid, config, *, progress, desc, checkpoint_dir, checkpoint_every,
           resume, stop_after_steps) -> TrainResult:
    shard = current_shard()
    source = InMemoryBatches(features, train, batch_size=config.batch_size, seed=config.seed,
                             shard=shard) if isinstance(train, EncodedEvents) else train
    model, sparse_opt, dense_opt = build_model(features, config)
    id_l2 = FrequencyL2.of(features, config.id_l2_frequency)
    average = TailAverage(model)
    result = TrainResult(model=model)
    progress = progress and shard.rank == 0
    # Everything a resumed run needs besides the tensors.
    state = {"epoch": 0, "step": 0, "global_step": 0, "best_auc": -1.0, "best_epoch": 0.0,
             "best_step": 0, "stale": 0, "history": [], "loss_sum": 0.0, "loss_n": 0, "seen": 0,
             "train_seconds": 0.0, "avg_count": 0}
    best: dict[str, torch.Tensor] = {}
    best_skeleton = None
    # table_reinit_each_epoch: the tables and their Adagrad state as the tables' first
    # trained epoch found them, restored at the start of every later epoch.
    fresh_tables: dict[str, torch.Tensor] = {}
    fresh_skeleton = None

    if checkpoint_dir is not None:
        found = latest_checkpoint(checkpoint_dir, shard.world_size)
        if resume and found is None:
            raise CheckpointError(f"--resume: no complete checkpoint in {checkpoint_dir}")
        if not resume and found is not None:
            raise CheckpointError(f"{checkpoint_dir} already holds checkpoints ({found.name}); "
                                  "pass --resume to continue that run or choose a new directory")
        if resume:
            tensors, saved = load_checkpoint(found / f"rank{shard.rank}.safetensors")
            if saved["world_size"] != shard.world_size:
                raise CheckpointError(f"{found}: written by {saved['world_size']} processes, "
                                      f"resuming with {shard.world_size}")
            _restore_model(model, saved["model"], tensors, "model")
            _restore_optimizer(sparse_opt, saved["sparse_opt"], tensors, "sparse optimizer")
            _restore_optimizer(dense_opt, saved["dense_opt"], tensors, "dense optimizer")
            best = {k: v for k, v in tensors.items() if k.startswith("best/")}
            best_skeleton = saved["best"]
            fresh_skeleton = saved.get("fresh_tables")
            fresh_tables = {k: v for k, v in tensors.items() if k.startswith("fresh_")}
            state = saved["progress"]
            average.from_checkpoint(tensors, state.get("avg_count", 0))
            result.resumed = True
            if progress:
                tqdm.write(f"{desc}: resumed from {found} (epoch {state['epoch'] + 1}, "
                           f"step {state['step']})")
    elif resume:
        raise CheckpointError("--resume needs a checkpoint directory")

    def checkpoint() -> None:
        if checkpoint_dir is None:
            return
        tensors: dict[str, torch.Tensor] = dict(best)
        state["avg_count"] = average.to_checkpoint(tensors)
        tensors.update(fresh_tables)
        saved = {"world_size": shard.world_size, "progress": state, "best": best_skeleton,
                 "fresh_tables": fresh_skeleton,
                 "model": _model_state(model, tensors, "model"),
                 "sparse_opt": _optimizer_state(sparse_opt, tensors, "sparse_opt"),
                 "dense_opt": _optimizer_state(dense_opt, tensors, "dense_opt")}
        save_checkpoint(checkpoint_dir, state["global_step"], shard.rank, tensors, saved)
        if shard.world_size > 1:
            dist.barrier()
        if shard.rank == 0:
            prune_checkpoints(checkpoint_dir, Path(checkpoint_dir) / f"step-{state['global_step']:08d}")

    def validate(epoch: int, n_batches: int) -> bool:
        """Scores the validation events, keeps the best step's weights; True: stop."""
        nonlocal best, best_skeleton
        labels = valid.labels.numpy()
        with average.applied():
            probs = predict(model, features, valid)
            valid_auc = auc(labels, probs)
            if valid_auc > state["best_auc"]:
                best = {"best/valid_probs": torch.from_numpy(probs)}
                best_skeleton = _model_state(model, best, "best")
        average.reset()
        train_loss = state["loss_sum"] / max(state["loss_n"], 1)
        row = {"epoch": epoch + state["step"] / n_batches, "step": state["global_step"],
               "train_loss": train_loss, "valid_auc": valid_auc}
        state["history"].append(row)
        state.update(loss_sum=0.0, loss_n=0)
        if progress:
            tqdm.write(f"{desc} epoch {row['epoch']:.2f} (step {row['step']}): train loss "
                       f"{train_loss:.4f}  valid AUC {valid_auc:.4f}")
        if valid_auc > state["best_auc"]:
            state.update(best_auc=valid_auc, best_epoch=row["epoch"], best_step=row["step"],
                         stale=0)
            return False
        if epoch < config.table_warmup_epochs:  # the tables have not had their turn yet
            return False
        best_probs = best.get("best/valid_probs")  # absent in checkpoints of before
        if config.patience_counts == "clearly_worse" and best_probs is not None:
            # Worse than the best by more than two standard errors of the paired
            # difference on these rows: on a small validation set, a flat curve's noise
            # alone would otherwise end the run at a random step.
            diff, se = paired_auc_difference(labels, probs, best_probs.numpy())
            if not diff < -2 * se:
                return False
        state["stale"] += 1
        if (state["stale"] >= config.patience and config.table_reinit_on_plateau
                and not config.table_reinit_each_epoch and state.get("reinit_epoch") is None
                and fresh_skeleton is not None):
            _restore_model(model, best_skeleton, best, "best model")
            state.update(stale=0, reinit_epoch=epoch + 1)
            raise _EndEpoch
        return state["stale"] >= config.patience

    model.train()
    stop = False
    while state["epoch"] < config.epochs and not stop:
        epoch = state["epoch"]
        n_batches = source.num_batches(epoch)
        checks = validation_steps(n_batches, config.validations_per_epoch)
        snapshots = snapshot_steps(checks, config.averaged_snapshots) \
            if config.averaged_snapshots > 1 else set()
        for group in sparse_opt.param_groups:
            group["lr"] = table_learning_rate(config, epoch)
        sparse_opt.step()  # pushes the rate into the fused kernels (no update: no gradients)
        reinit = config.table_reinit_each_epoch or config.table_reinit_on_plateau
        if reinit and state["step"] == 0:
            if epoch == config.table_warmup_epochs:
                fresh_tables = {}
                fresh_skeleton = {
                    "tables": flatten_state(_table_state(model), "fresh_tables", fresh_tables),
                    "opt": _optimizer_state(sparse_opt, fresh_tables, "fresh_opt")}
            elif (epoch > config.table_warmup_epochs and fresh_skeleton is not None
                  and (config.table_reinit_each_epoch or state.get("reinit_epoch") is not None)):
                copy_into(_table_state(model),
                          unflatten_state(fresh_skeleton["tables"], fresh_tables), "tables")
                _restore_optimizer(sparse_opt, fresh_skeleton["opt"], fresh_tables,
                                   "table optimizer")
        bar = tqdm(total=n_batches, initial=state["step"], unit="batch", leave=False,
                   desc=f"{desc} epoch {epoch + 1}/{config.epochs}", disable=not progress,
                   mininterval=1.0)
        start = time.perf_counter()
        for dense, kjt, labels in source.batches(epoch, item_id_dropout=config.item_id_dropout,
                                                 cross_id_dropout=config.cross_id_dropout,
                                                 start=state["step"]):
            loss = train_step(model, sparse_opt, dense_opt, (dense, kjt, labels), id_l2)
            state["loss_sum"] += loss.item()
            state["loss_n"] += 1
            state["seen"] += len(labels) * shard.world_size
            state["step"] += 1
            state["global_step"] += 1
            bar.update(1)
            if state["step"] in snapshots:
                average.add()
            if state["step"] in checks:  # validation time is not training time
                state["train_seconds"] += time.perf_counter() - start
                try:
                    stop = validate(epoch, n_batches)
                except _EndEpoch:  # table_reinit_on_plateau: the next epoch restarts them
                    start = time.perf_counter()
                    break
                start = time.perf_counter()
            if stop or state["step"] == n_batches:
                break
            if checkpoint_every and state["global_step"] % checkpoint_every == 0:
                state["train_seconds"] += time.perf_counter() - start
                checkpoint()
                start = time.perf_counter()
            if stop_after_steps is not None and state["global_step"] >= stop_after_steps:
                bar.close()
                result.model = model
                state["train_seconds"] += time.perf_counter() - start
                result.train_examples_per_s = state["seen"] / max(state["train_seconds"], 1e-9)
                return result
        bar.close()
        state.update(epoch=config.epochs if stop else epoch + 1, step=0)
        checkpoint()
    if best_skeleton is not None:
        _restore_model(model, best_skeleton, best, "best model")
    if shard.world_size == 1:
        result.model = unshard_model(model, features, config)
    result.history = state["history"]
    result.best_epoch = state["best_epoch"]
    result.best_step = state["best_step"]
    result.tables_restarted_from_epoch = state.get("reinit_epoch")
    result.valid_auc = state["best_auc"]
    result.train_examples_per_s = state["seen"] / max(state["train_seconds"], 1e-9)
    return result
