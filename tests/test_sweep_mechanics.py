"""Sweep mechanics without training: job directory names, skip logic, failure summary."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from qlora_exp.errors import ConfigError, DataError, ExitCode
from qlora_exp.run.context import RunContext
from qlora_exp.run.directory import ABSENT, REDACTED, config_diff
from qlora_exp.run.redaction import redact_yaml_file
from qlora_exp.run.sweep import (
    MAX_DIRNAME,
    MULTIRUN_FILE,
    JobNames,
    SweepSummary,
    end_failed_job,
    find_job_dirs,
    finished_objective,
    job_dirname,
    job_state,
    split_job_overrides,
)
from qlora_exp.schema import CONF_DIR, TrackingConfig

RESOLVED: dict[str, Any] = {"seed": 42, "lora": {"r": 8, "alpha": 32}, "trainer": {"learning_rate": 2e-4}}


def finished_run(path: Path, resolved: dict[str, Any], eval_loss: float = 6.25) -> Path:
    """A job directory whose run COMPLETED with `resolved`."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("- lora.r=8\n")
    (path / "resolved_config.yaml").write_text(yaml.safe_dump(resolved))
    (path / "metrics.json").write_text(json.dumps({"eval_loss": eval_loss}))
    (path / "COMPLETED").write_text("ok\n")
    return path


def test_job_dirname_is_the_overrides() -> None:
    assert (
        job_dirname("lora.r=16,trainer.learning_rate=0.0002", 3) == "lora.r=16,trainer.learning_rate=0.0002"
    )


def test_job_dirname_is_one_path_component() -> None:
    name = job_dirname("data.path=/data/train.jsonl,lora.r=8", 0)
    assert "/" not in name and "data.path=%2Fdata%2Ftrain.jsonl" in name


def test_job_dirname_without_overrides_uses_the_job_number() -> None:
    assert job_dirname("", 0) == "job_0"


def test_long_job_dirnames_are_shortened_but_stay_distinct() -> None:
    first = job_dirname("x" * 300 + "a", 0)
    second = job_dirname("x" * 300 + "b", 1)
    assert len(first) == len(second) == MAX_DIRNAME
    assert first != second


def job_overrides(hydra: DictConfig) -> tuple[list[str], list[str]]:
    """A job's (varying, shared) overrides, split as qlora-train's entry point splits them."""
    return split_job_overrides(
        list(hydra.overrides.task), set(hydra.job.config.override_dirname.exclude_keys)
    )


class Multirun:
    """A sweep as `qlora-train -m OVERRIDES` composes it, with the JobNames callback applied, and its
    jobs' configs as a launcher composes them (Hydra's own config loader, no process, no training)."""

    def __init__(self, sweep_dir: Path, *overrides: str) -> None:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            self.loader = GlobalHydra.instance().config_loader()
            self.config = self.loader.load_configuration(
                "config", [*overrides, f"hydra.sweep.dir={sweep_dir}"], run_mode=RunMode.MULTIRUN
            )
        JobNames().on_multirun_start(self.config)

    def job(self, *overrides: str, num: int = 0) -> DictConfig:
        job = self.loader.load_sweep_config(self.config, list(overrides))
        with open_dict(job.hydra.job):
            job.hydra.job.num = num  # a launcher numbers its jobs
        return job

    def job_name(self, *overrides: str) -> str:
        """The job's directory name: hydra.sweep.subdir as conf/config.yaml resolves it."""
        return str(OmegaConf.select(self.job(*overrides), "hydra.sweep.subdir"))

    def save(self) -> None:
        """What Hydra's sweeper does next: record the sweep's config in multirun.yaml."""
        OmegaConf.save(self.config, Path(self.config.hydra.sweep.dir) / MULTIRUN_FILE)


def test_jobs_are_named_by_the_keys_that_vary(tmp_path: Path) -> None:
    sweep = Multirun(tmp_path, "experiment=smoke", "data=local", "data.path=/data/x.json", "lora.r=4,8")
    # the basic sweeper gives each job every override, constant ones included
    job = ("experiment=smoke", "data=local", "data.path=/data/x.json", "lora.r=4")
    assert sweep.job_name(*job) == "lora.r=4"
    hydra = sweep.job(*job).hydra
    varying, shared = job_overrides(hydra)
    run = RunContext(tmp_path / "lora.r=4", tmp_path, tuple(varying), tuple(shared))
    assert run.tracking_group_and_name() == (tmp_path.name, "lora.r=4")
    assert run.tracking_config()["sweep"]["shared_overrides"] == [
        "data.path=/data/x.json",
        "data=local",
        "experiment=smoke",
    ]
    assert run.tracking_tags() == ["data.path=/data/x.json", "data=local", "experiment=smoke"]
    # multirun.yaml records which keys were left out of the names
    assert list(sweep.config.hydra.job.config.override_dirname.exclude_keys) == [
        "data",
        "data.path",
        "experiment",
    ]


def test_a_preset_sweep_replaced_on_the_command_line_is_constant(tmp_path: Path) -> None:
    # rank_lr_grid sweeps lora.r and trainer.learning_rate; the command line fixes the learning rate
    sweep = Multirun(tmp_path, "experiment=rank_lr_grid", "trainer.learning_rate=1e-3")
    assert sweep.job_name("lora.r=8", "trainer.learning_rate=0.001", "experiment=rank_lr_grid") == "lora.r=8"


def test_optuna_trials_are_named_by_their_parameters(tmp_path: Path) -> None:
    sweep = Multirun(tmp_path, "experiment=rank_lr_optuna", "trainer.max_steps=1")
    # the Optuna sweeper gives each trial its parameters, then the fixed overrides
    trial = (
        "lora.r=16",
        "trainer.learning_rate=0.000123",
        "experiment=rank_lr_optuna",
        "trainer.max_steps=1",
    )
    assert sweep.job_name(*trial) == "lora.r=16,trainer.learning_rate=0.000123"


def test_a_sweep_without_varying_keys_names_its_job_by_number(tmp_path: Path) -> None:
    sweep = Multirun(tmp_path, "experiment=smoke", "lora.r=4")
    assert sweep.job_name("experiment=smoke", "lora.r=4") == "job_0"


def refused(sweep_dir: Path, *overrides: str, caplog: pytest.LogCaptureFixture) -> str:
    """The error a sweep command ends with (exit 1) before any job runs."""
    caplog.clear()
    with pytest.raises(SystemExit) as exit_info:
        Multirun(sweep_dir, *overrides)
    assert exit_info.value.code == ExitCode.CONFIG
    return caplog.text


def test_a_rerun_with_other_constant_overrides_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = Multirun(tmp_path, "experiment=smoke", "trainer.learning_rate=1e-3", "lora.r=4,8")
    first.save()
    Multirun(tmp_path, "lora.r=4,8", "trainer.learning_rate=0.001", "experiment=smoke")  # same sweep: fine
    Multirun(tmp_path, "experiment=smoke", "trainer.learning_rate=1e-3", "lora.r=4,8,16")  # more values: fine
    error = refused(
        tmp_path,
        "experiment=smoke",
        "trainer.learning_rate=1e-3",
        "trainer.max_steps=2",
        "lora.r=4,8",
        caplog=caplog,
    )
    assert f"{ABSENT} -> trainer.max_steps=2" in error and "new hydra.sweep.dir" in error
    error = refused(tmp_path, "experiment=smoke", "trainer.learning_rate=2e-3", "lora.r=4,8", caplog=caplog)
    assert "trainer.learning_rate=0.001 -> trainer.learning_rate=0.002" in error
    error = refused(tmp_path, "experiment=smoke", "trainer.learning_rate=1e-3", "lora.r=4", caplog=caplog)
    assert f"lora.r: {ABSENT} -> lora.r=4" in error  # one job of the sweep alone


def test_secret_constant_overrides_stay_out_of_names_and_tags_and_reruns_match(tmp_path: Path) -> None:
    secret = "+hub_token=hf_secret_value_123"
    first = Multirun(tmp_path, "experiment=smoke", secret, "lora.r=4,8")
    first.save()
    redact_yaml_file(tmp_path / MULTIRUN_FILE, {"hf_secret_value_123"})  # as RedactSecrets does
    assert "hf_secret_value_123" not in (tmp_path / MULTIRUN_FILE).read_text()
    rerun = Multirun(tmp_path, "experiment=smoke", secret, "lora.r=4,8")  # not refused
    hydra = rerun.job("experiment=smoke", secret, "lora.r=4").hydra
    varying, shared = job_overrides(hydra)
    assert varying == ["lora.r=4"]
    assert shared == ["+hub_token=" + REDACTED, "experiment=smoke"]


def test_config_diff_names_nested_differences() -> None:
    changed = {**RESOLVED, "lora": {"r": 16, "alpha": 32}, "extra": 1}
    assert config_diff(RESOLVED, changed) == {"extra": (ABSENT, 1), "lora.r": (RESOLVED["lora"]["r"], 16)}
    assert config_diff(RESOLVED, RESOLVED) == {}


def sweep_job(path: Path) -> RunContext:
    return RunContext(path, sweep_dir=path.parent, job_overrides=("lora.r=4",))


def test_completed_job_with_same_config_is_skipped(tmp_path: Path) -> None:
    run = finished_run(tmp_path / "job", RESOLVED)
    assert finished_objective(sweep_job(run), RESOLVED) == 6.25


def test_completed_job_with_changed_config_is_refused_and_kept(tmp_path: Path) -> None:
    run = finished_run(tmp_path / "job", RESOLVED)
    with pytest.raises(ConfigError, match=r"COMPLETED job with another resolved config.*seed") as refused:
        finished_objective(sweep_job(run), {**RESOLVED, "seed": 7})
    failure = end_failed_job(ExitCode.CONFIG, refused.value, sweep_job(run))
    assert failure.exit_code == ExitCode.CONFIG
    assert (run / "COMPLETED").is_file() and not (run / "FAILED").exists()  # its results stand


def test_failed_job_reruns(tmp_path: Path) -> None:
    run = finished_run(tmp_path / "job", RESOLVED)
    (run / "COMPLETED").unlink()
    (run / "FAILED").write_text("DataError: nope\n")
    assert finished_objective(sweep_job(run), RESOLVED) is None


def test_single_runs_never_skip(tmp_path: Path) -> None:
    run = finished_run(tmp_path / "job", RESOLVED)
    assert finished_objective(RunContext(run), RESOLVED) is None  # not a sweep job


def test_a_single_run_failure_exits_with_its_code(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        end_failed_job(ExitCode.DATA, DataError("bad rows"), RunContext(tmp_path / "run"))
    assert exit_info.value.code == ExitCode.DATA


def test_a_sweep_job_failure_is_returned_and_marked(tmp_path: Path) -> None:
    (tmp_path / "job").mkdir()  # Hydra makes the job directory before the job starts
    failure = end_failed_job(ExitCode.DATA, DataError("bad rows"), sweep_job(tmp_path / "job"))
    assert failure.exit_code == ExitCode.DATA
    assert (tmp_path / "job" / "FAILED").read_text().startswith("DataError: bad rows")


def test_job_states_from_markers(tmp_path: Path) -> None:
    done = finished_run(tmp_path / "a", RESOLVED)
    failed = finished_run(tmp_path / "b", RESOLVED)
    (failed / "COMPLETED").unlink()
    (failed / "FAILED").write_text("NumericalError: loss is nan\n")
    killed = finished_run(tmp_path / "c", RESOLVED)
    (killed / "COMPLETED").unlink()
    assert find_job_dirs(tmp_path) == [done, failed, killed]
    assert job_state(done).status == "COMPLETED"
    assert job_state(failed).status == "FAILED" and "loss is nan" in job_state(failed).reason
    assert job_state(killed).status == "INCOMPLETE"


def sweep_config(sweep_dir: Path) -> Any:
    """The parts of a sweep's config SweepSummary reads (root=None: leave logging alone)."""
    hydra = {
        "sweep": {"dir": str(sweep_dir)},
        "hydra_logging": {"version": 1, "root": None},
        "verbose": False,
    }
    return OmegaConf.create({"hydra": hydra})


def test_summary_exits_non_zero_when_a_job_failed(tmp_path: Path) -> None:
    summary = SweepSummary()
    summary.on_multirun_start(sweep_config(tmp_path))
    finished_run(tmp_path / "good", RESOLVED)
    bad = finished_run(tmp_path / "bad", RESOLVED)
    (bad / "COMPLETED").unlink()
    (bad / "FAILED").write_text("DataError: no usable rows\n")
    with pytest.raises(SystemExit) as exit_info:
        summary.on_multirun_end(sweep_config(tmp_path))
    assert exit_info.value.code == ExitCode.SWEEP_JOBS_FAILED


def test_summary_ignores_jobs_of_earlier_invocations(tmp_path: Path) -> None:
    old = finished_run(tmp_path / "old-trial", RESOLVED)
    (old / "COMPLETED").unlink()  # e.g. an Optuna trial killed in an earlier run of the study
    stale = time.time() - 3600
    os.utime(old / ".hydra" / "overrides.yaml", (stale, stale))
    summary = SweepSummary()
    summary.on_multirun_start(sweep_config(tmp_path))
    finished_run(tmp_path / "new-trial", RESOLVED)
    summary.on_multirun_end(sweep_config(tmp_path))  # no SystemExit: every job launched now COMPLETED


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("project", "", "tracking.project"),
        ("job_type", "", "tracking.job_type"),
        ("group", "", "tracking.group"),
        ("tags", ["x" * 65], "tracking.tags"),
    ],
)
def test_tracking_config_rejects(field: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrackingConfig(**{field: value})
