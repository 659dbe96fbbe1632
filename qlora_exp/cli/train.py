"""qlora-train: Hydra composes the config and names the run directory; `run_job` does the rest.

This is the only module that reads Hydra's runtime state (`HydraConfig`): it turns it into a
`RunContext`, which everything downstream takes as an argument.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from qlora_exp.cli import imports_done
from qlora_exp.experiment import run_job
from qlora_exp.run.context import RunContext
from qlora_exp.run.distributed import run_stamp
from qlora_exp.run.gpu_share import register_gpu_share_launcher
from qlora_exp.run.resume import register_resolvers
from qlora_exp.run.sweep import JobFailure, register_sweep_configs, split_job_overrides
from qlora_exp.schema import CONF_DIR, register_configs

register_sweep_configs()
register_configs()
register_gpu_share_launcher()
OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)
register_resolvers()


def hydra_run_context() -> RunContext:
    """The run's directory and, in a multirun, its sweep directory and overrides (split into those
    that name the job and those the `JobNames` callback found constant across the sweep), from Hydra."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return RunContext(run_dir)
    constant_keys = set(hydra_cfg.job.config.override_dirname.exclude_keys)
    varying, shared = split_job_overrides(list(hydra_cfg.overrides.task), constant_keys)
    return RunContext(run_dir, Path(hydra_cfg.sweep.dir), tuple(varying), tuple(shared))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | JobFailure:
    """Console entry point; failures become documented exit codes (README, "Exit codes"),
    or, inside a sweep, a JobFailure so that the other jobs still run."""
    imports_done()
    return run_job(cfg, hydra_run_context())


if __name__ == "__main__":
    main()
