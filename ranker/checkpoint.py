"""Training checkpoints: atomic, checksummed, one safetensors file per rank, no pickle.

    CKPT_DIR/step-00001200/rank0.safetensors    (written to .tmp, fsynced, renamed)
    CKPT_DIR/step-00001200/rank1.safetensors
    CKPT_DIR/step-00000600/...                  (the previous generation, kept until
                                                 the next one is complete)

Each file holds the rank's tensors (its own shards of sharded tables, as they lie in
its memory) and, in the safetensors header, a JSON ``state`` (the training progress and
the layout of nested optimizer states) and a SHA-256 over every tensor's bytes. A
generation is complete when every rank's file exists; ``latest_checkpoint`` picks the
newest complete one, and a file whose checksum does not match is refused with an
error, never skipped or silently replaced by a fresh start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

try:  # torchrec's sharded tables hold ShardedTensors in their state dicts
    from torch.distributed._shard.sharded_tensor import ShardedTensor
except ImportError:  # pragma: no cover
    ShardedTensor = ()  # type: ignore[assignment]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted (corrupt, truncated, from another run layout)."""


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def flatten_state(tree: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Moves every tensor of a nested state (dicts, lists, ShardedTensors) into
    ``tensors`` and returns a JSON-able skeleton that ``unflatten_state`` inverts.
    Dict keys keep their type (optimizer states are keyed by int)."""
    if isinstance(tree, ShardedTensor):
        shards = tree.local_shards()
        for i, shard in enumerate(shards):
            tensors[f"{prefix}@{i}"] = shard.tensor.detach().clone()
        return {"__sharded__": prefix, "n": len(shards)}
    if torch.is_tensor(tree):
        tensors[prefix] = tree.detach().clone()
        return {"__tensor__": prefix}
    if isinstance(tree, dict):
        return {"__dict__": [[k, flatten_state(v, f"{prefix}/{k}", tensors)] for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return {"__list__": [flatten_state(v, f"{prefix}/{i}", tensors) for i, v in enumerate(tree)]}
    return tree


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The nested state back, with plain tensors (a sharded entry becomes the list of
    this rank's local shard tensors)."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__sharded__" in skeleton:
            return [tensors[f"{skeleton['__sharded__']}@{i}"] for i in range(skeleton["n"])]
        if "__dict__" in skeleton:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [unflatten_state(v, tensors) for v in skeleton["__list__"]]
    return skeleton


@torch.no_grad()
def copy_into(live: Any, saved: Any, where: str) -> None:
    """Copies a restored state into live tensors in place (model weights, sharded
    optimizer states); shapes must match exactly."""
    if isinstance(live, ShardedTensor):
        shards = live.local_shards()
        if not isinstance(saved, list) or len(saved) != len(shards):
            raise CheckpointError(f"{where}: sharding differs from the checkpoint's "
                                  "(resume needs the same number of processes)")
        for shard, tensor in zip(shards, saved):
            _copy_tensor(shard.tensor, tensor, where)
    elif torch.is_tensor(live):
        _copy_tensor(live, saved, where)
    elif isinstance(live, dict):
        if not isinstance(saved, dict) or set(live) - set(saved):
            raise CheckpointError(f"{where}: entries {sorted(map(str, set(live) - set(saved or {})))[:5]} "
                                  "missing from the checkpoint")
        for key, value in live.items():
            copy_into(value, saved[key], f"{where}/{key}")


def _copy_tensor(live: torch.Tensor, saved: Any, where: str) -> None:
    if not torch.is_tensor(saved) or saved.shape != live.shape:
        shape = tuple(saved.shape) if torch.is_tensor(saved) else type(saved).__name__
        raise CheckpointError(f"{where}: checkpoint holds {shape}, the model {tuple(live.shape)}")
    live.copy_(saved)


def save_checkpoint(ckpt_dir: str | Path, step: int, rank: int,
                    tensors: dict[str, torch.Tensor], state: dict) -> Path:
    """Writes this rank's file of generation ``step`` atomically; returns its path."""
    gen = Path(ckpt_dir) / f"step-{step:08d}"
    gen.mkdir(parents=True, exist_ok=True)
    path = gen / f"rank{rank}.safetensors"
    tmp = path.with_suffix(".safetensors.tmp")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={"state": json.dumps(state),
                                           "sha256": _checksum(tensors)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, state)`` of one rank file, after verifying its checksum."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({err})") from err
    if "sha256" not in meta or "state" not in meta:
        raise CheckpointError(f"{path}: not an mmtok checkpoint (no checksum/state header)")
    if _checksum(tensors) != meta["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch - the checkpoint is corrupt; "
                              "delete this step directory to resume from the one before")
    return tensors, json.loads(meta["state"])


def latest_checkpoint(ckpt_dir: str | Path, world_size: int) -> Path | None:
    """The newest generation directory that every rank finished writing, or None."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return None
    for gen in sorted(root.glob("step-*"), reverse=True):
        if all((gen / f"rank{r}.safetensors").is_file() for r in range(world_size)):
            return gen
    return None


def prune_checkpoints(ckpt_dir: str | Path, keep: Path) -> None:
    """Removes every generation other than ``keep`` (call once ``keep`` is complete)."""
    for gen in Path(ckpt_dir).glob("step-*"):
        if gen.resolve() != Path(keep).resolve():
            shutil.rmtree(gen, ignore_errors=True)
