"""Sweep jobs through Hydra launcher plugins (submitit's local executor, Ray on the CPU), and the
launcher and sweep presets composing as documented."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from qlora_exp.cli.train import CONF_DIR
from tests.conftest import run_cli, run_cli_in_process

# The plugin is in the dev extra (CI runs these tests) and the ray extra.
RAY = importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is not None
NO_RAY = "the Ray plugin is not installed: pip install -e '.[ray]' (make install includes it)"
TWO_JOBS = ("experiment=smoke", "trainer.max_steps=1", "data.synthetic_size=24", "lora.r=4,8")


def hydra_config(*overrides: str) -> DictConfig:
    """The composed config including its hydra node, as a multirun would see it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def completed_jobs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if (p / "COMPLETED").is_file())


def test_slurm_preset_asks_for_one_gpu_per_job() -> None:
    launcher = hydra_config("hydra/launcher=slurm", "hydra.launcher.partition=gpu").hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.partition) == (1, 1, "gpu")
    assert launcher.submitit_folder.endswith("/.submitit/%j")  # the plugin's defaults are kept
    assert launcher.max_num_timeout > 0  # a timed-out job is requeued and resumes


@pytest.mark.skipif(not RAY, reason=NO_RAY)
def test_ray_gpus_preset_asks_for_one_gpu_per_job() -> None:
    launcher = hydra_config("hydra/launcher=ray_gpus").hydra.launcher
    assert launcher._target_.endswith("RayLauncher")
    assert launcher.ray.remote.num_gpus == 1


def test_grid_preset_is_a_multirun_over_rank_and_learning_rate() -> None:
    hydra = hydra_config("experiment=rank_lr_grid").hydra
    assert str(hydra.mode) == "RunMode.MULTIRUN"
    assert dict(hydra.sweeper.params) == {"lora.r": "8,16,32", "trainer.learning_rate": "1e-4,2e-4"}


def test_optuna_preset_stores_its_study_in_the_sweep_dir() -> None:
    sweeper = hydra_config("experiment=rank_lr_optuna", "hydra.sweep.dir=/data/sweeps/s1").hydra.sweeper
    assert sweeper.storage == "sqlite:////data/sweeps/s1/optuna.db"
    assert sweeper.study_name == "rank_lr_optuna"
    assert sweeper.sampler._target_.endswith("TPESampler")


@pytest.mark.slow
def test_grid_preset_runs_two_jobs_with_submitit_local_executor(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "submitit"
    # The preset's own lists are replaced by the command line's, as in any Hydra sweep.
    overrides = [o for o in TWO_JOBS if not o.startswith("experiment=")]
    # The sweep's own process in this one; submitit starts a process per job.
    result = run_cli_in_process(
        "qlora-train",
        "-m",
        "experiment=[rank_lr_grid,smoke]",
        *overrides,
        "trainer.learning_rate=1e-3",
        "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    jobs = completed_jobs(sweep_dir)
    # named by what varies, also when the launcher composes each job's config for another process
    assert [job.name for job in jobs] == ["lora.r=4", "lora.r=8"]
    assert list((sweep_dir / ".submitit").iterdir())  # the jobs ran through submitit
    for job in jobs:
        assert yaml.safe_load((job / "resolved_config.yaml").read_text())["tracking"]["tags"] == [
            "rank_lr_grid"
        ]


@pytest.mark.slow
@pytest.mark.skipif(not RAY, reason=NO_RAY)
def test_two_jobs_as_ray_tasks_on_the_cpu(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "ray"
    result = run_cli(
        "qlora-train",
        "-m",
        *TWO_JOBS,
        "hydra/launcher=ray_gpus",
        "hydra.launcher.ray.remote.num_gpus=0",
        "+hydra.launcher.ray.init.num_cpus=2",
        "+hydra.launcher.ray.init.include_dashboard=false",  # seconds less to start Ray
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert len(completed_jobs(sweep_dir)) == 2
    assert "_run_job pid=" in result.stdout + result.stderr  # Ray's worker-prefixed job logs
