"""qlora-compare's table logic on synthetic sweep directories (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from qlora_exp.cli.compare import main
from qlora_exp.comparison.jobs import diff_runs, load_job, param_value, shared_overrides, swept_keys
from qlora_exp.comparison.table import (
    build_comparison,
    comparison_table,
    fairness_warnings,
    seed_summary,
    write_comparison,
)
from qlora_exp.errors import ExitCode

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_job(
    sweep: Path,
    overrides: dict[str, Any],
    eval_loss: float | None,
    *,
    failed: str = "",
    batch: int = 4,
    steps: int = 4,
    tokens: int = 500,
) -> Path:
    """A job directory as qlora-train leaves it: overrides, resolved config, metrics, history, marker."""
    path = sweep / ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([f"{k}={v}" for k, v in overrides.items()])
    )
    config: dict[str, Any] = {
        "seed": 42,
        "lora": {"r": 16, "alpha": 32},
        "trainer": {
            "learning_rate": 2e-4,
            "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": 1,
        },
    }
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    (path / "resolved_config.yaml").write_text(yaml.safe_dump(config))
    if failed:
        (path / "FAILED").write_text(failed + "\n")
        return path
    metrics = {
        "eval_loss_before": 7.0,
        "eval_loss": eval_loss,
        "perplexity": math.exp(eval_loss or 0),
        "train_tokens_per_second": 100.0,
        "peak_memory_gb": 0.5,
        "train_runtime_s": 2.0,
        "train_steps": steps,
        "train_tokens": tokens,
    }
    (path / "metrics.json").write_text(json.dumps(metrics))
    history = [{"loss": 7.0 - 0.1 * s, "step": s} for s in range(1, steps + 1)]
    history.append({"eval_loss": eval_loss, "step": steps})
    (path / "log_history.json").write_text(json.dumps(history))
    (path / "COMPLETED").write_text("ok\n")
    return path


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    """A 2x2 rank x learning-rate sweep; one job failed."""
    for r, lr, loss in ((8, 1e-4, 6.5), (8, 2e-4, 6.1), (16, 1e-4, 6.3)):
        make_job(tmp_path, {"experiment": "smoke", "lora.r": r, "trainer.learning_rate": lr}, loss)
    make_job(
        tmp_path,
        {"experiment": "smoke", "lora.r": 16, "trainer.learning_rate": 2e-4},
        None,
        failed="NumericalError: loss is nan at step 3",
    )
    return tmp_path


def jobs_of(sweep: Path) -> list[Any]:
    return [load_job(p) for p in sorted(q for q in sweep.iterdir() if (q / ".hydra").is_dir())]


def test_swept_keys_are_the_overrides_that_differ(grid: Path) -> None:
    assert swept_keys(jobs_of(grid)) == ["lora.r", "trainer.learning_rate"]
    assert shared_overrides(jobs_of(grid)) == ["experiment=smoke"]


def test_param_value_is_typed_from_the_resolved_config(grid: Path) -> None:
    job = next(j for j in jobs_of(grid) if "lora.r=8,trainer.learning_rate=0.0001" in j.path.name)
    assert param_value(job, "lora.r") == 8
    assert param_value(job, "trainer.learning_rate") == pytest.approx(1e-4)
    assert param_value(job, "experiment") == "smoke"  # a group choice: not a scalar in the config


def test_table_has_one_row_per_job_sorted_with_failures_last(grid: Path) -> None:
    table = comparison_table(jobs_of(grid), "eval_loss")
    assert list(table["eval_loss"][:3]) == [6.1, 6.3, 6.5]
    assert table.iloc[-1]["status"] == "FAILED"
    assert math.isnan(table.iloc[-1]["eval_loss"])
    assert "loss is nan" in table.iloc[-1]["note"]
    assert {
        "lora.r",
        "trainer.learning_rate",
        "perplexity",
        "tokens_per_s",
        "peak_memory_gb",
        "runtime_s",
    } <= set(table.columns)


def test_maximize_reverses_the_order(grid: Path) -> None:
    table = comparison_table(jobs_of(grid), "eval_loss", maximize=True)
    assert list(table["eval_loss"][:3]) == [6.5, 6.3, 6.1]


def test_a_dpo_beta_sweep_shows_and_ranks_by_reward_figures(tmp_path: Path, grid: Path) -> None:
    for beta, accuracy, margin in ((0.05, 0.6, 0.02), (0.1, 0.8, 0.05), (0.5, 0.7, 0.3)):
        job = make_job(tmp_path / "dpo", {"method.beta": beta}, 0.69)
        metrics = json.loads((job / "metrics.json").read_text())
        metrics.update(reward_accuracy=accuracy, reward_margin=margin)
        (job / "metrics.json").write_text(json.dumps(metrics))
    table = comparison_table(jobs_of(tmp_path / "dpo"), "reward_accuracy", maximize=True)
    assert list(table["method.beta"]) == [0.1, 0.5, 0.05]
    assert list(table["reward_margin"]) == [0.05, 0.3, 0.02]
    # An SFT sweep's table has no reward columns.
    assert "reward_accuracy" not in comparison_table(jobs_of(grid), "eval_loss").columns


def test_seed_summary_gives_mean_and_std_per_setting(tmp_path: Path) -> None:
    for r in (8, 16):
        for seed, loss in ((1, 6.0), (2, 6.2), (3, 6.4)):
            make_job(tmp_path, {"lora.r": r, "seed": seed}, loss + (r == 16))
    jobs = jobs_of(tmp_path)
    keys = swept_keys(jobs)
    stats = seed_summary(comparison_table(jobs, "eval_loss"), keys, "eval_loss")
    assert stats is not None
    by_r = stats.set_index("lora.r")
    assert by_r.loc[8, "eval_loss_mean"] == pytest.approx(6.2)
    assert by_r.loc[16, "eval_loss_mean"] == pytest.approx(7.2)
    assert by_r.loc[8, "eval_loss_std"] == pytest.approx(0.2)
    assert by_r.loc[8, "seeds"] == 3


def test_no_seed_summary_without_a_seed_sweep(grid: Path) -> None:
    jobs = jobs_of(grid)
    assert seed_summary(comparison_table(jobs, "eval_loss"), swept_keys(jobs), "eval_loss") is None


def test_fair_sweep_has_no_warnings(grid: Path) -> None:
    assert fairness_warnings(jobs_of(grid)) == []


def test_warns_when_effective_batch_or_token_budget_differ(tmp_path: Path) -> None:
    make_job(tmp_path, {"lora.r": 8}, 6.0, batch=4, tokens=500)
    make_job(tmp_path, {"lora.r": 16}, 6.0, batch=8, tokens=1000)
    warnings = fairness_warnings(jobs_of(tmp_path))
    assert any("effective batch" in w for w in warnings)
    assert any("examples seen" in w for w in warnings)
    assert any("tokens differ" in w for w in warnings)


def test_effective_batch_recorded_by_a_data_parallel_run_counts(tmp_path: Path) -> None:
    make_job(tmp_path, {"lora.r": 8}, 6.0, batch=4)
    ddp = make_job(tmp_path, {"lora.r": 16}, 6.0, batch=4)  # same per-device batch, on 2 ranks
    metrics = json.loads((ddp / "metrics.json").read_text())
    (ddp / "metrics.json").write_text(json.dumps({**metrics, "world_size": 2, "effective_batch_size": 8}))
    warnings = fairness_warnings(jobs_of(tmp_path))
    assert any("effective batch sizes differ" in w and ": 8" in w for w in warnings)


def test_small_token_differences_between_seeds_are_tolerated(tmp_path: Path) -> None:
    make_job(tmp_path, {"seed": 1}, 6.0, tokens=500)
    make_job(tmp_path, {"seed": 2}, 6.0, tokens=520)
    assert fairness_warnings(jobs_of(tmp_path)) == []


def test_compare_writes_csv_markdown_and_plots(grid: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(grid)])
    out = capsys.readouterr().out
    assert "Best run: experiment=smoke,lora.r=8,trainer.learning_rate=0.0002 (eval_loss=6.1)" in out
    csv = pd.read_csv(grid / "comparison.csv")
    assert len(csv) == 4
    assert list(csv["status"]).count("COMPLETED") == 3
    markdown = (grid / "comparison.md").read_text()
    assert "Best run" in markdown and markdown.count("| experiment=smoke") == 4
    for name in ("loss_curves.png", "heatmap_eval_loss.png"):
        assert (grid / name).read_bytes().startswith(PNG_MAGIC)


def test_one_swept_parameter_gives_no_heatmap(tmp_path: Path) -> None:
    for r, loss in ((8, 6.2), (16, 6.1)):
        make_job(tmp_path, {"lora.r": r}, loss)
    write_comparison(build_comparison(tmp_path))
    assert (tmp_path / "loss_curves.png").is_file()
    assert not list(tmp_path.glob("heatmap_*.png"))


def test_cli_rejects_a_directory_without_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no job directories" in capsys.readouterr().err


def test_cli_rejects_an_unknown_metric(grid: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(grid), "--metric", "eval_los"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--metric eval_los: no job has it" in err and "eval_loss" in err


R8 = "experiment=smoke,lora.r=8,trainer.learning_rate=0.0001"
R16 = "experiment=smoke,lora.r=16,trainer.learning_rate=0.0001"


def test_diff_shows_the_config_keys_that_differ_and_the_metrics(
    grid: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    diff = diff_runs(grid / R8, grid / R16)
    assert diff.config.to_dict("records") == [{"key": "lora.r", "A": "8", "B": "16"}]
    eval_loss = diff.metrics.set_index("metric").loc["eval_loss"]
    assert (eval_loss["A"], eval_loss["B"]) == (6.5, 6.3)
    assert eval_loss["B - A"] == pytest.approx(-0.2)
    main([str(grid), "--diff", R8, R16])  # job names are looked up in the sweep directory
    out = capsys.readouterr().out
    assert f"A: {grid / R8} (COMPLETED)" in out and "resolved config keys that differ: 1" in out
    assert [line.split() for line in out.splitlines() if line.startswith("lora.r")] == [["lora.r", "8", "16"]]


def test_diff_with_a_failed_run_shows_its_missing_metrics(grid: Path) -> None:
    failed = grid / "experiment=smoke,lora.r=16,trainer.learning_rate=0.0002"
    diff = diff_runs(grid / R16, failed)
    assert diff.second.status == "FAILED"
    assert list(diff.config["key"]) == ["trainer.learning_rate"]
    assert diff.metrics.set_index("metric").loc["eval_loss"].isna().tolist() == [False, True, True]


def test_diff_refuses_a_directory_that_is_not_a_run(grid: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--diff", str(grid / R8), str(grid)])  # the sweep directory itself is no run
    assert exit_info.value.code == ExitCode.RUN_DIR
    assert "resolved_config.yaml: not a qlora-train run" in caplog.text


def test_diff_refuses_the_options_of_a_sweep_comparison(
    grid: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(grid), "--diff", R8, R16, "--wandb"])
    assert exit_info.value.code == 2
    assert "--diff compares two runs" in capsys.readouterr().err
