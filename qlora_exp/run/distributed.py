"""What a process needs to know when `torchrun` / `accelerate launch` start several of them.

All ranks share one run directory and one resolved config; only rank 0 writes files, logs at
INFO and tracks (transformers' Trainer already saves checkpoints on rank 0 only).
"""

from __future__ import annotations

import hashlib
import logging
import os
from datetime import datetime

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def world_size() -> int:
    """Number of processes in this run (1 when not launched distributed)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on global rank 0, and in a plain single-process run."""
    return int(os.environ.get("RANK", "0")) == 0


def run_stamp() -> str:
    """Hydra run-directory name, identical on every rank of one launch.

    A timestamp differs between ranks by microseconds, so distributed launches use the launcher's
    rendezvous id (`torchrun --standalone`) or, failing that, the launcher's PID, which all ranks
    share as their parent process.
    """
    now = datetime.now()
    if world_size() == 1:
        return now.strftime("%Y-%m-%d/%H-%M-%S.%f")
    launch_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if launch_id in ("", "none"):
        launch_id = f"pid{os.getppid()}"
    return now.strftime("%Y-%m-%d/") + f"ddp-{launch_id}"


def quiet_non_main_ranks() -> None:
    """Ranks other than 0 log warnings and errors only."""
    if not is_main_process():
        logging.getLogger().setLevel(logging.WARNING)


def parameters_agree_across_ranks(model: torch.nn.Module) -> bool:
    """True when every rank holds bit-identical trainable parameters (always true on one process)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    if not (dist.is_available() and dist.is_initialized()):
        return True
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    return len(set(digests)) == 1
