import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# Without a GPU the Triton kernels run in Triton's interpreter (numpy, on CPU tensors).
# It is chosen when a kernel is decorated, i.e. when kernels/triton/* is first imported,
# so it must be set before any test module imports it.
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def small_world():
    """A small synthetic world: 2,000 items in 8 topics, 40,000 events."""
    from mmdata import SyntheticWorldConfig, generate_world

    return generate_world(SyntheticWorldConfig(n_items=2_000, n_users=800, n_events=40_000,
                                               dim=32, n_clusters=8, subclusters_per_cluster=4,
                                               seed=7), progress=False)


@pytest.fixture(scope="session")
def movielens():
    from mmdata import load_movielens_100k

    return load_movielens_100k()


@pytest.fixture(scope="session")
def clustered_embeddings():
    """(3000, 24) float32: 30 well separated clusters on the unit sphere."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(30, 24))
    x = centers[rng.integers(0, 30, size=3000)] + 0.25 * rng.normal(size=(3000, 24))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


class ServeProcess:
    """``mmtok serve --model MODEL --port 0`` in its own process, for tests of the real
    command: ``banner`` is the line it prints once serving, ``addr`` its address.
    ``stop()`` sends SIGTERM and returns the exit status; leaving the ``with`` block
    kills a server still running."""

    def __init__(self, model: str, *, cwd, env: dict | None = None) -> None:
        import subprocess
        import sys
        from pathlib import Path

        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": str(root), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "mmtok.cli", "serve", "--model",
                                      model, "--port", "0"], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.banner = self.proc.stdout.readline()  # printed once serving (EOF if it failed)
        assert " on 127.0.0.1:" in self.banner, self.banner
        self.addr = self.banner.split(" on ")[1].split()[0]

    def stop(self) -> int:
        import signal

        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
