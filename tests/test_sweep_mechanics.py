"""Sweep mechanics without training: job directory names, skip logic, failure summary."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from qlora_exp.errors import ConfigError, DataError, ExitCode
from qlora_exp.run.context import RunContext
from qlora_exp.run.directory import ABSENT, config_diff
from qlora_exp.run.sweep import (
    MAX_DIRNAME,
    SweepSummary,
    end_failed_job,
    find_job_dirs,
    finished_objective,
    job_dirname,
    job_state,
)
from qlora_exp.schema import TrackingConfig

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


def test_config_diff_names_nested_differences() -> None:
    changed = {**RESOLVED, "lora": {"r": 16, "alpha": 32}, "extra": 1}
    assert config_diff(RESOLVED, changed) == {"extra": (ABSENT, 1), "lora.r": (RESOLVED["lora"]["r"], 16)}
    assert config_diff(RESOLVED, RESOLVED) == {}


def sweep_job(path: Path) -> RunContext:
    return RunContext(path, sweep_dir=path.parent, job_overrides=("lora.r=4",))


def test_completed_job_with_same_config_is_skipped(tmp_path: Path) -> None:
    run = finished_run(tmp_path / "job", RESOLVED)
    assert finished_objective(sweep_job(run), RESOLVED) == 6.25


def test_completed_job_with_changed_config_reruns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = finished_run(tmp_path / "job", RESOLVED)
    with caplog.at_level(logging.WARNING):
        assert finished_objective(sweep_job(run), {**RESOLVED, "seed": 7}) is None
    assert "resolved config changed at seed" in caplog.text


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
