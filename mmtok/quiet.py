"""What the command line silences in every process that trains or serves a model."""

from __future__ import annotations

import logging
import warnings


def quiet_library_warnings() -> None:
    """Silences what TorchRec and torch print on every run of a model this size and a
    user can do nothing about: the planner's storage warnings ("... otherwise, the job
    will fail"), DMP's and ShardedTensor's deprecation notices, fx's tracing note."""
    warnings.filterwarnings("ignore", module=r"torchrec\.distributed\.planner.*")
    warnings.filterwarnings("ignore", message=r"`broadcast_buffers` is deprecated",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"Please use DTensor instead",
                            category=FutureWarning)
    for name in ("torchrec.distributed.planner", "torch.fx._symbolic_trace"):
        logging.getLogger(name).setLevel(logging.ERROR)
