"""Sweeps as a user runs them: `qlora-train -m ...` then `qlora-compare SWEEP_DIR` (tiny smoke runs)."""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import yaml

from qlora_exp.cli.compare import main as compare_main
from qlora_exp.errors import ExitCode
from tests.support import CliResult, model_artifacts, run_cli_in_process, wandb_records

# One worker runs the module: its tests share one grid sweep (module fixture).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("grid_sweep")]

Sweep = tuple[Path, CliResult]
GRID = ("experiment=smoke", "trainer.max_steps=2", "lora.r=4,8", "trainer.learning_rate=1e-3,2e-3")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sweep(sweep_dir: Path, *overrides: str) -> CliResult:
    """`qlora-train -m OVERRIDES hydra.sweep.dir=SWEEP_DIR` (Hydra's basic launcher runs the jobs in
    this process, one after the other, as in the console script's own process)."""
    return run_cli_in_process("qlora-train", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}")


def output(result: CliResult) -> str:
    return result.stdout + result.stderr


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir())


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """A 2x2 rank x learning-rate sweep of smoke runs, tracked by W&B offline."""
    sweep_dir = tmp_path_factory.mktemp("sweeps") / "rank-lr-smoke"
    return sweep_dir, sweep(sweep_dir, *GRID, "tracking=wandb")


@pytest.fixture(scope="module")
def job_records(grid_sweep: Sweep) -> dict[Path, list[dict[str, Any]]]:
    """Each grid job's offline W&B run records, read once."""
    sweep_dir, _ = grid_sweep
    return {job: wandb_records(run_file(job)) for job in job_dirs(sweep_dir)}


def run_file(directory: Path) -> Path:
    """The .wandb file of the one offline W&B run in `directory`."""
    (path,) = directory.glob("wandb/offline-run-*/run-*.wandb")
    return path


def test_grid_sweep_runs_four_completed_jobs(
    grid_sweep: Sweep,
) -> None:
    sweep_dir, result = grid_sweep
    assert result.returncode == 0, output(result)[-3000:]
    jobs = job_dirs(sweep_dir)
    # named by the keys that vary; the constant overrides are in multirun.yaml
    assert [j.name for j in jobs] == [
        f"lora.r={r},trainer.learning_rate={lr}" for r in (4, 8) for lr in ("0.001", "0.002")
    ]
    multirun = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())
    assert multirun["hydra"]["overrides"]["task"] == [*GRID, "tracking=wandb"]
    assert multirun["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"] == [
        "experiment",
        "tracking",
        "trainer.max_steps",
    ]
    for job in jobs:
        assert (job / "COMPLETED").is_file()
        history = json.loads((job / "log_history.json").read_text())
        assert [e["step"] for e in history if "loss" in e] == [1, 2]
    assert "sweep" in output(result) and "4 jobs, 4 COMPLETED, 0 not" in output(result)


def test_each_job_is_its_own_offline_wandb_run_in_the_sweep_group(
    job_records: dict[Path, list[dict[str, Any]]],
) -> None:
    run_ids, names = set(), set()
    shared = ["experiment=smoke", "tracking=wandb", "trainer.max_steps=2"]
    for job, records in job_records.items():
        (run,) = [r["run"] for r in records if r["type"] == "run"]
        assert run["run_group"] == "rank-lr-smoke"
        assert run["job_type"] == "train"
        resolved = yaml.safe_load((job / "resolved_config.yaml").read_text())
        config = run["config"]["update"]
        assert {k: config[k] for k in resolved} == resolved
        assert config["trainable_params"] > 0 and config["lora_scale"] == 32 / resolved["lora"]["r"]
        assert run["display_name"] == job.name  # what varies: lora.r=...,trainer.learning_rate=...
        assert run["tags"] == config["sweep"]["shared_overrides"] == shared
        assert run["run_id"] == (job / "wandb_run_id.txt").read_text().strip()
        summary: dict[str, Any] = {}
        for record in records:
            if record["type"] == "summary":
                summary.update(record["summary"]["update"])
        metrics = json.loads((job / "metrics.json").read_text())
        assert summary["eval_loss"] == pytest.approx(metrics["eval_loss"])
        assert summary["train_tokens"] == metrics["train_tokens"]
        run_ids.add(run["run_id"])
        names.add(run["display_name"])
    assert len(run_ids) == len(names) == 4


def test_each_job_logs_its_adapter_as_a_model_artifact(job_records: dict[Path, list[dict[str, Any]]]) -> None:
    for job, records in job_records.items():
        (run,) = [r["run"] for r in records if r["type"] == "run"]
        (artifact,) = model_artifacts(records)
        assert (artifact["type"], artifact["name"]) == ("model", f"adapter-{run['run_id']}")
        logged = {entry["path"] for entry in artifact["manifest"]["contents"]}
        saved = {str(p.relative_to(job)) for d in ("adapter", "tokenizer") for p in (job / d).rglob("*")}
        assert logged == saved and "adapter/adapter_model.safetensors" in logged  # nothing else
        metadata = json.loads(artifact["metadata"])
        resolved = yaml.safe_load((job / "resolved_config.yaml").read_text())
        provenance = json.loads((job / "provenance.json").read_text())
        metrics = json.loads((job / "metrics.json").read_text())
        assert metadata["base_model"] == resolved["model"]["name_or_path"]
        assert metadata["lora"] == resolved["lora"]
        assert metadata["data_fingerprint"] == provenance["data_fingerprint"]
        assert metadata["git_commit"] == provenance["git"]["commit"]
        assert metadata["metrics"]["eval_loss"] == pytest.approx(metrics["eval_loss"])


def test_compare_prints_one_row_per_job_and_writes_files(
    grid_sweep: Sweep,
) -> None:
    sweep_dir, _ = grid_sweep
    result = run_cli_in_process("qlora-compare", str(sweep_dir))
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "COMPLETED" in line]
    assert len(rows) == 4
    table = pd.read_csv(sweep_dir / "comparison.csv")
    assert list(table["eval_loss"]) == sorted(table["eval_loss"])
    assert set(table["lora.r"]) == {4, 8} and set(table["trainer.learning_rate"]) == {1e-3, 2e-3}
    best = table.iloc[0]["job"]
    assert f"Best run: {best}" in result.stdout
    assert f"Best run: {best}" in (sweep_dir / "comparison.md").read_text()
    for name in ("loss_curves.png", "heatmap_eval_loss.png"):
        assert (sweep_dir / name).read_bytes().startswith(PNG_MAGIC)


def test_compare_wandb_logs_the_sweep_as_one_comparison_run(grid_sweep: Sweep) -> None:
    sweep_dir, _ = grid_sweep
    compare_main([str(sweep_dir), "--wandb"])
    records = wandb_records(run_file(sweep_dir))  # the comparison run lives in the sweep directory
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert (run["job_type"], run["run_group"], run["display_name"]) == (
        "comparison",
        "rank-lr-smoke",
        "comparison",
    )
    best = pd.read_csv(sweep_dir / "comparison.csv").iloc[0]
    config = run["config"]["update"]
    assert config["best_run"] == best["job"]
    assert config["best_config"] == yaml.safe_load(
        (sweep_dir / best["job"] / "resolved_config.yaml").read_text()
    )
    assert config["sweep"]["swept_keys"] == ["lora.r", "trainer.learning_rate"]
    summary: dict[str, Any] = {}
    for record in records:
        if record["type"] == "summary":
            summary.update(record["summary"]["update"])
    assert summary["comparison._type"] == "table-file" and summary["comparison.nrows"] == 4
    assert summary["loss_curves._type"] == summary["heatmap_eval_loss._type"] == "image-file"
    assert summary["best_run"] == best["job"] and summary["best_eval_loss"] == pytest.approx(
        best["eval_loss"]
    )

    compare_main([str(sweep_dir), "--wandb"])  # a rerun continues the same W&B run
    rerun_ids = {wandb_run_id(f) for f in sweep_dir.glob("wandb/offline-run-*/run-*.wandb")}
    assert rerun_ids == {run["run_id"]} and len(list(sweep_dir.glob("wandb/offline-run-*"))) == 2


def wandb_run_id(run_file: Path) -> str:
    return run_file.name.removeprefix("run-").removesuffix(".wandb")


def test_diff_names_the_rank_between_two_jobs(grid_sweep: Sweep, capsys: pytest.CaptureFixture[str]) -> None:
    sweep_dir, _ = grid_sweep
    compare_main(
        [
            str(sweep_dir),
            "--diff",
            "lora.r=4,trainer.learning_rate=0.001",
            "lora.r=8,trainer.learning_rate=0.001",
        ]
    )
    out = capsys.readouterr().out
    assert "resolved config keys that differ: 1" in out
    assert [line.split() for line in out.splitlines() if line.startswith("lora.r")] == [["lora.r", "4", "8"]]


def test_sync_dry_run_lists_every_offline_run_once(grid_sweep: Sweep) -> None:
    sweep_dir, _ = grid_sweep
    result = run_cli_in_process("qlora-sync", str(sweep_dir), "--dry-run")
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    assert all(command[1] == "sync" and Path(command[0]).name == "wandb" for command in commands)
    listed = [{wandb_run_id(next(Path(f).glob("run-*.wandb"))) for f in command[2:]} for command in commands]
    expected = [(job / "wandb_run_id.txt").read_text().strip() for job in job_dirs(sweep_dir)]
    if (sweep_dir / "wandb_run_id.txt").is_file():  # the comparison run, when the test above ran
        expected.append((sweep_dir / "wandb_run_id.txt").read_text().strip())
    assert sorted(run_id for ids in listed for run_id in ids) == sorted(expected)
    assert all(len(ids) == 1 for ids in listed)  # one command per run, all its folders in it


def test_a_rerun_with_other_constant_overrides_is_refused(grid_sweep: Sweep) -> None:
    sweep_dir, _ = grid_sweep
    before = {j: (j / "metrics.json").stat().st_mtime_ns for j in job_dirs(sweep_dir)}
    result = sweep(sweep_dir, *GRID, "tracking=wandb", "seed=7")
    assert result.returncode == ExitCode.CONFIG, output(result)[-3000:]
    assert "other constant overrides (seed: <absent> -> seed=7)" in output(result)
    assert {j: (j / "metrics.json").stat().st_mtime_ns for j in job_dirs(sweep_dir)} == before


def test_rerunning_a_finished_sweep_trains_nothing(
    grid_sweep: Sweep,
) -> None:
    sweep_dir, _ = grid_sweep
    jobs = job_dirs(sweep_dir)
    before = {j: (j / "metrics.json").stat().st_mtime_ns for j in jobs}
    result = sweep(sweep_dir, *GRID, "tracking=wandb")
    assert result.returncode == 0, output(result)[-3000:]
    assert output(result).count("COMPLETED with the same resolved config") == 4
    assert "eval_loss before training" not in output(result)
    assert {j: (j / "metrics.json").stat().st_mtime_ns for j in jobs} == before
    assert all(len(list(j.glob("wandb/offline-run-*"))) == 1 for j in jobs)  # no new W&B runs


def test_a_failing_job_does_not_stop_the_sweep_and_a_rerun_retries_only_it(tmp_path: Path) -> None:
    # max_length=16 drops every example: that job fails in its data stage, the other trains.
    poisoned = ("experiment=smoke", "trainer.max_steps=1", "data.max_length=16,256")
    sweep_dir = tmp_path / "poisoned"
    result = sweep(sweep_dir, *poisoned)
    assert result.returncode == ExitCode.SWEEP_JOBS_FAILED, output(result)[-3000:]
    good = sweep_dir / "data.max_length=256"
    bad = sweep_dir / "data.max_length=16"
    assert (good / "COMPLETED").is_file()
    assert "DataError" in (bad / "FAILED").read_text() and "data.max_length" in (bad / "FAILED").read_text()
    assert "2 jobs, 1 COMPLETED, 1 not" in output(result)
    assert "FAILED data.max_length=16" in output(result)

    completed_at = (good / "COMPLETED").stat().st_mtime_ns
    failed_at = (bad / "FAILED").stat().st_mtime_ns
    rerun = sweep(sweep_dir, *poisoned)
    assert rerun.returncode == ExitCode.SWEEP_JOBS_FAILED
    assert (good / "COMPLETED").stat().st_mtime_ns == completed_at  # skipped
    assert (bad / "FAILED").stat().st_mtime_ns > failed_at  # tried again


@pytest.fixture
def optuna_logs_to_the_sweep() -> Iterator[None]:
    """Optuna's logger writes to the stderr of its import time; for the duration of a test, send its
    records to the sweep's logging set-up instead, whose output the test reads."""
    optuna.logging.enable_propagation()
    optuna.logging.disable_default_handler()
    yield
    optuna.logging.enable_default_handler()
    optuna.logging.disable_propagation()


@pytest.mark.usefixtures("optuna_logs_to_the_sweep")
def test_optuna_preset_runs_three_trials_and_resumes(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "optuna"
    overrides = ("experiment=[rank_lr_optuna,smoke]", "trainer.max_steps=1", "data.synthetic_size=24")
    first = sweep(sweep_dir, *overrides, "hydra.sweeper.n_trials=3")
    assert first.returncode == 0, output(first)[-3000:]
    storage = f"sqlite:///{sweep_dir}/optuna.db"
    study = optuna.load_study(study_name="rank_lr_optuna", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert len(job_dirs(sweep_dir)) == 3
    for trial in study.trials:  # the trial's value is the eval_loss of the job with its parameters
        (job,) = [
            j
            for j in job_dirs(sweep_dir)
            if f"lora.r={trial.params['lora.r']}," in j.name
            and f"trainer.learning_rate={trial.params['trainer.learning_rate']}" in j.name
        ]
        assert trial.value == pytest.approx(json.loads((job / "metrics.json").read_text())["eval_loss"])

    resumed = sweep(sweep_dir, *overrides, "hydra.sweeper.n_trials=1")
    assert resumed.returncode == 0, output(resumed)[-3000:]
    assert "Using an existing study with name 'rank_lr_optuna'" in output(resumed)
    study = optuna.load_study(study_name="rank_lr_optuna", storage=storage)
    assert len(study.trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
