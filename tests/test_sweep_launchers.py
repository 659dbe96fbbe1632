"""Sweep jobs through Hydra launcher plugins (Ray on the CPU, gpu_share; submitit's local executor in
test_requeue.py, whose sweep also preempts a job), and the launcher and sweep presets composing as
documented."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from qlora_exp.cli.train import CONF_DIR
from qlora_exp.errors import ConfigError
from qlora_exp.run.directory import HISTORY_FILE
from qlora_exp.run.gpu_share import choose_jobs_per_gpu
from tests.support import run_cli_in_process, train_in_process

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
@pytest.mark.skipif(not RAY, reason=NO_RAY)
def test_two_jobs_as_ray_tasks_on_the_cpu(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "ray"
    # The sweep's own process (Ray's driver) is this one; Ray starts the job processes. The launcher
    # leaves Ray running after the sweep, as a process would at its exit: stopped here.
    import ray  # noqa: PLC0415  here, not at the top: the ray extra is optional (RAY) and every worker imports this module

    try:
        result = run_cli_in_process(
            "qlora-train",
            "-m",
            *TWO_JOBS,
            "hydra/launcher=ray_gpus",
            "hydra.launcher.ray.remote.num_gpus=0",
            "+hydra.launcher.ray.init.num_cpus=2",
            "+hydra.launcher.ray.init.include_dashboard=false",  # seconds less to start Ray
            f"hydra.sweep.dir={sweep_dir}",
        )
    finally:
        ray.shutdown()
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert len(completed_jobs(sweep_dir)) == 2
    assert "_run_job pid=" in result.stdout + result.stderr  # Ray's worker-prefixed job logs


def test_gpu_share_runs_as_many_jobs_as_fit_or_refuses() -> None:
    h200, peak = 139.8, 23.5  # GiB: an H200, experiments/gemma2_9b_gpu.yaml's measured peak
    assert choose_jobs_per_gpu(None, peak, h200, overhead_gb=3.0) == 5  # 139.8 // 26.5
    assert choose_jobs_per_gpu(4, peak, h200, overhead_gb=3.0) == 4
    with pytest.raises(ConfigError, match=r"6 job\(s\) of 23.5 GiB.*need 159.0 GiB.*jobs_per_gpu=5"):
        choose_jobs_per_gpu(6, peak, h200, overhead_gb=3.0)
    with pytest.raises(ConfigError, match="a smaller batch or a larger GPU"):
        choose_jobs_per_gpu(None, 30.0, 24.0)
    assert choose_jobs_per_gpu(2, None, None) == 2  # the CPU, or an unknown peak: the user's K
    with pytest.raises(ConfigError, match=r"peak memory is unknown.*hydra\.launcher\.job_memory_gb"):
        choose_jobs_per_gpu(None, None, h200)
    with pytest.raises(ConfigError, match=r"no CUDA GPU.*hydra\.launcher\.jobs_per_gpu=K"):
        choose_jobs_per_gpu(None, peak, None)
    with pytest.raises(ConfigError, match="jobs_per_gpu must be >= 1"):
        choose_jobs_per_gpu(0, peak, h200)


def test_gpu_share_preset_is_joblib_sized_by_the_experiments_peak_memory() -> None:
    launcher = hydra_config("hydra/launcher=gpu_share", "experiment=gemma2_9b_gpu").hydra.launcher
    assert launcher._target_.endswith("GpuShareLauncher")
    assert launcher.job_memory_gb == 23.5  # the preset's peak_memory_gb
    assert launcher.prefer == "processes"  # hydra-joblib-launcher's own settings are kept
    assert instantiate(launcher, gpu_memory_gb=139.8).joblib["n_jobs"] == 5
    # Hydra wraps what the launcher raises (InstantiationException), message included.
    with pytest.raises(InstantiationException, match=r"hydra\.launcher\.jobs_per_gpu=3"):
        instantiate(launcher, gpu_memory_gb=139.8, n_jobs=3)  # joblib's own knob would bypass the check
    with pytest.raises(InstantiationException, match="jobs_per_gpu=5"):
        instantiate(launcher, gpu_memory_gb=139.8, jobs_per_gpu=6)


@pytest.mark.slow
def test_gpu_share_runs_two_jobs_at_once_with_the_losses_of_a_run_alone(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "gpu_share"
    two_steps = (
        "experiment=smoke",
        "trainer.max_steps=2",
        "trainer.logging_steps=1",
        "data.synthetic_size=24",
    )
    # The sweep's own process in this one; joblib starts the job processes.
    result = run_cli_in_process(
        "qlora-train",
        "-m",
        *two_steps,
        "lora.r=4,8",
        "hydra/launcher=gpu_share",
        "hydra.launcher.jobs_per_gpu=2",  # no GPU here: K processes on the CPU
        f"hydra.sweep.dir={sweep_dir}",
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "gpu_share: 2 jobs at once on the CPU" in out and "Joblib.Parallel(n_jobs=2" in out
    assert [job.name for job in completed_jobs(sweep_dir)] == ["lora.r=4", "lora.r=8"]

    def losses(run_dir: Path) -> list[float]:
        history = json.loads((run_dir / HISTORY_FILE).read_text(encoding="utf-8"))
        return [entry["loss"] for entry in history if "loss" in entry]

    alone = tmp_path / "alone"
    train_in_process(alone, *two_steps, "lora.r=8")
    assert losses(sweep_dir / "lora.r=8") == losses(alone) and len(losses(alone)) == 2
