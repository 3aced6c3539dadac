"""The one quantizer registry: ``kind`` -> class, how to build one, save it and load it back.

A saved quantizer is a directory whose ``quantizer.json`` names its ``kind``;
``load_quantizer`` reads it and hands the directory to that class's ``load``, so the
ranker bundle, the server and the benchmarks never branch on a quantizer's class.

Example::

    q = build_quantizer("mmdict", seed=0, scale_sizes=[16, 64, 256]).fit(x)
    directory = save_quantizer(q, "runs/x/quantizer")
    assert (load_quantizer(directory).encode(x) == q.encode(x)).all()
"""

from __future__ import annotations

from pathlib import Path

from quantizer.base import Quantizer, read_quantizer_meta, total_bits
from quantizer.baselines import FaissPQ, FaissRQ, KMeansQuantizer, LSHQuantizer
from quantizer.conditional import ConditionalRQConfig, ConditionalRQQuantizer
from quantizer.mmdict import MmDictConfig, MmDictQuantizer
from quantizer.residual_kmeans import ResidualKMeansConfig, ResidualKMeansQuantizer

QUANTIZERS: dict[str, type] = {
    cls.kind: cls for cls in (MmDictQuantizer, ResidualKMeansQuantizer,
                              FaissRQ, FaissPQ, KMeansQuantizer, LSHQuantizer,
                              ConditionalRQQuantizer)
}


def load_quantizer(directory: str | Path) -> Quantizer:
    """The quantizer saved in ``directory``, whatever its kind.

    Raises:
        FileNotFoundError: ``directory`` holds no ``quantizer.json``.
        ValueError: ``quantizer.json`` is unreadable or names an unknown kind.
    """
    meta = read_quantizer_meta(directory)
    kind = meta.get("kind")
    if kind not in QUANTIZERS:
        raise ValueError(f"{directory}: quantizer kind {kind!r} is unknown; known kinds: "
                         f"{', '.join(sorted(QUANTIZERS))}")
    return QUANTIZERS[kind].load(directory)


def save_quantizer(quantizer: Quantizer, directory: str | Path) -> Path:
    """Saves a fitted quantizer (``quantizer.json`` + safetensors); returns ``directory``."""
    return quantizer.save(directory)


def build_quantizer(kind: str, *, seed: int, steps: int | None = None,
                    scale_sizes: list[int] | None = None, levels: int | None = None,
                    task_signal: str | None = None, scale_mode: str | None = None
                    ) -> MmDictQuantizer | ResidualKMeansQuantizer | ConditionalRQQuantizer:
    """An unfitted quantizer of a (scales x levels) layout: "mmdict" (the learned one),
    "conditional_rq" (QINCo-style codebooks adapted to the codes chosen so far: better
    codes, far slower encode) or "rq-kmeans" (parallel residual k-means scales, the
    simple baseline; its saved kind is "residual_kmeans", also accepted here). Unset arguments keep the config's
    defaults; ``q.config`` holds the result. ``task_signal`` ("co_engagement" or
    "clicks", mmdict only): task-aware tokens, fitted with the training events'
    engagement (``quantizer.task_aware``). ``scale_mode`` (mmdict only): "parallel" (each
    scale quantizes the whole latent, the default) or "cascade" (one residual chain
    through the scales)."""
    layout = {k: v for k, v in {"scale_sizes": scale_sizes, "levels": levels}.items()
              if v is not None}
    if task_signal is not None and kind != "mmdict":
        raise ValueError(f"task-aware tokens (task_signal={task_signal!r}) are built on mmdict, "
                         f"not {kind!r}")
    if scale_mode is not None and kind != "mmdict":
        raise ValueError(f"scale_mode={scale_mode!r} is an mmdict option, not {kind!r}'s")
    if kind == "mmdict":
        return MmDictQuantizer(MmDictConfig(seed=seed, task_signal=task_signal, **layout,
                                            **({"mode": scale_mode} if scale_mode else {}),
                                            **({"steps": steps} if steps else {})))
    if kind in ("rq-kmeans", ResidualKMeansQuantizer.kind):
        return ResidualKMeansQuantizer(ResidualKMeansConfig(seed=seed, **layout))
    if kind == ConditionalRQQuantizer.kind:
        return ConditionalRQQuantizer(ConditionalRQConfig(seed=seed, **layout,
                                                          **({"steps": steps} if steps else {})))
    raise ValueError(f"unknown quantizer {kind!r}: choose 'mmdict', 'rq-kmeans' or "
                     f"'{ConditionalRQQuantizer.kind}'")


def build_quantizers(scale_sizes: list[int], levels: int, *, seed: int, steps: int | None,
                     kind: str = "mmdict", scale_mode: str | None = None
                     ) -> dict[str, Quantizer]:
    """mmtok's quantizer (of ``kind``, see ``build_quantizer``) and the baselines at the
    same total bits, unfitted, keyed "mmtok", "faiss_rq", "faiss_pq", "kmeans", "lsh"
    (k-means: one codebook of the largest size)."""
    mmtok = build_quantizer(kind, seed=seed, steps=steps, scale_sizes=scale_sizes,
                            levels=levels, scale_mode=scale_mode)
    bits = int(round(total_bits(mmtok.codebook_sizes)))
    pq_bits = next((b for b in (8, 6, 4, 3, 2, 1) if bits % b == 0))
    lsh_bits = next((b for b in (6, 4, 3, 2, 1) if bits % b == 0))
    return {
        "mmtok": mmtok,
        "faiss_rq": FaissRQ(mmtok.codebook_sizes),
        "faiss_pq": FaissPQ(bits, nbits=pq_bits),
        "kmeans": KMeansQuantizer(max(scale_sizes), seed=seed),
        "lsh": LSHQuantizer(bits, bits_per_code=lsh_bits, seed=seed),
    }
