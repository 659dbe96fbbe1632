"""`hydra/launcher=gpu_share`: hydra-joblib-launcher with as many workers as jobs fit on one GPU.

Hydra instantiates launchers only from the `hydra_plugins` namespace package, hence this module; the
config and the choice of K are in qlora_exp/run/gpu_share.py.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

from qlora_exp.errors import ConfigError
from qlora_exp.run.gpu_share import PROCESS_OVERHEAD_GB, choose_jobs_per_gpu, total_gpu_memory_gb

log = logging.getLogger(__name__)


class GpuShareLauncher(JoblibLauncher):
    """hydra-joblib-launcher with K = `choose_jobs_per_gpu(...)` worker processes."""

    def __init__(
        self,
        jobs_per_gpu: int | None = None,
        job_memory_gb: float | None = None,
        gpu_memory_gb: float | None = None,
        process_overhead_gb: float = PROCESS_OVERHEAD_GB,
        n_jobs: int | None = None,
        **joblib: Any,
    ) -> None:
        if n_jobs is not None:
            raise ConfigError(
                "hydra.launcher.n_jobs is set by hydra/launcher=gpu_share from jobs_per_gpu. "
                f"Fix: hydra.launcher.jobs_per_gpu={n_jobs}"
            )
        gpu_gb = gpu_memory_gb if gpu_memory_gb is not None else total_gpu_memory_gb()
        k = choose_jobs_per_gpu(jobs_per_gpu, job_memory_gb, gpu_gb, process_overhead_gb)
        where = f"one GPU of {gpu_gb:.1f} GiB" if gpu_gb is not None else "the CPU"
        memory = f"{job_memory_gb:g} GiB peak per job" if job_memory_gb is not None else "peak memory unknown"
        log.info("gpu_share: %d jobs at once on %s (%s)", k, where, memory)
        super().__init__(n_jobs=k, **joblib)
