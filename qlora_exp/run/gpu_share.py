"""`hydra/launcher=gpu_share`: K sweep jobs at once on one GPU, each its own process.

One QLoRA job leaves the GPU idle for much of every step (host-bound kernel launches: BENCHMARKS.md),
and a 9B model's job peaks at ~21 GiB of an H200's 140: K jobs side by side raise the aggregate
tokens/s. The scheduling is hydra-joblib-launcher's (a loky process pool of K workers; Hydra runs
each job there as it would anywhere); this module only chooses K and refuses a K that cannot fit
(the launcher class itself is in hydra_plugins/qlora_gpu_share/, where Hydra looks for plugins):

- `hydra.launcher.jobs_per_gpu=K`, checked against memory when the job's peak is known; or
- from memory: K = floor(GPU memory / (job peak + process overhead)). The job's peak is
  `hydra.launcher.job_memory_gb`, by default the sweep config's `peak_memory_gb` (an experiment
  preset sets it from a measurement, e.g. experiments/gemma2_9b_gpu.yaml; a finished run's
  metrics.json has `peak_memory_gb`). The GPU's memory is GPU 0's total, or `gpu_memory_gb`.

Every job runs on the first visible GPU; on a box with several, use `hydra/launcher=ray_gpus` with
`hydra.launcher.ray.remote.num_gpus=0.5` (two jobs per GPU, Ray sets each one's visible device).
Without a GPU, `jobs_per_gpu=K` runs K jobs at once on the CPU.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf

from qlora_exp.errors import ConfigError

log = logging.getLogger(__name__)

# GPU memory a job uses beyond torch's peak allocation (`peak_memory_gb`): its CUDA context (~0.5
# GiB) and what the caching allocator holds reserved but unallocated between steps.
PROCESS_OVERHEAD_GB = 3.0


@dataclass
class GpuShareLauncherConf(JobLibLauncherConf):
    """hydra-joblib-launcher's settings, with the pool's size chosen from GPU memory."""

    # Hydra instantiates launchers only from the hydra_plugins namespace package.
    _target_: str = "hydra_plugins.qlora_gpu_share.gpu_share_launcher.GpuShareLauncher"
    n_jobs: int | None = None  # set from jobs_per_gpu; setting it directly is refused
    jobs_per_gpu: int | None = None  # K; null: as many as fit in memory
    job_memory_gb: float | None = "${oc.select:peak_memory_gb,null}"  # type: ignore[assignment]
    gpu_memory_gb: float | None = None  # null: GPU 0's total memory
    process_overhead_gb: float = PROCESS_OVERHEAD_GB


def register_gpu_share_launcher() -> None:
    """Make `hydra/launcher=gpu_share` selectable (Hydra's ConfigStore, as the plugins do)."""
    ConfigStore.instance().store(group="hydra/launcher", name="gpu_share", node=GpuShareLauncherConf)


def total_gpu_memory_gb() -> float | None:
    """GPU 0's total memory in GiB, or None without a CUDA GPU. Its total, not what is free: asking
    for free memory would give this launcher process a CUDA context for the whole sweep."""
    if not torch.cuda.is_available():
        return None
    if torch.cuda.device_count() > 1:
        log.warning(
            "gpu_share: %d GPUs visible, every job runs on the first; for all of them use "
            "hydra/launcher=ray_gpus hydra.launcher.ray.remote.num_gpus=0.5 (2 jobs per GPU)",
            torch.cuda.device_count(),
        )
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def choose_jobs_per_gpu(
    requested: int | None,
    job_gb: float | None,
    gpu_gb: float | None,
    overhead_gb: float = PROCESS_OVERHEAD_GB,
) -> int:
    """How many jobs run at once: `requested` if they fit, else as many as fit; refuses what cannot."""
    if requested is not None and requested < 1:
        raise ConfigError(f"hydra.launcher.jobs_per_gpu must be >= 1, got {requested}. Fix: e.g. 2")
    if job_gb is not None and job_gb <= 0:
        raise ConfigError(f"hydra.launcher.job_memory_gb must be positive, got {job_gb}. Fix: e.g. 21")
    if job_gb is None or gpu_gb is None:
        if requested is not None:
            return requested  # nothing to check it against: the user's K
        missing = (
            "the job's peak memory is unknown"
            if job_gb is None
            else "no CUDA GPU is visible to measure its memory"
        )
        raise ConfigError(
            f"hydra/launcher=gpu_share: cannot choose how many jobs share the GPU: {missing}. Fix: set "
            "hydra.launcher.jobs_per_gpu=K, or hydra.launcher.job_memory_gb=GiB (a finished run's "
            "peak_memory_gb in metrics.json; an experiment preset may set peak_memory_gb) with a GPU "
            "visible or hydra.launcher.gpu_memory_gb=GiB"
        )
    per_job = job_gb + overhead_gb
    fits = math.floor(gpu_gb / per_job)
    if fits < 1 or (requested is not None and requested > fits):
        want = requested or 1
        raise ConfigError(
            f"hydra/launcher=gpu_share: {want} job(s) of {job_gb:g} GiB peak (+{overhead_gb:g} GiB per "
            f"process) need {want * per_job:.1f} GiB, the GPU has {gpu_gb:.1f} GiB: {fits} fit. Fix: "
            + (f"hydra.launcher.jobs_per_gpu={fits}" if fits >= 1 else "a smaller batch or a larger GPU")
        )
    return requested or fits
