"""`qlora-train` end to end: the console script's run directory (the shared smoke run), and whole
runs in-process (what the script runs after Hydra composed the config)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qlora_exp.errors import ExitCode
from tests.support import train_in_process

RUN_FILES = [
    ".hydra/config.yaml",
    ".hydra/overrides.yaml",
    ".hydra/hydra.yaml",
    "resolved_config.yaml",
    "provenance.json",
    "data_stats.json",
    "metrics.json",
    "adapter/adapter_model.safetensors",
    "adapter/adapter_config.json",
    "tokenizer/tokenizer.json",
    "train.log",
    "COMPLETED",
]
METRIC_KEYS = [
    "eval_loss_before",
    "eval_loss",
    "train_loss",
    "train_tokens_per_second",
    "train_runtime_s",
    "peak_memory_gb",
    "trainable_params",
]


def test_smoke_run_writes_the_whole_run_directory(smoke_run: Path) -> None:
    missing = [name for name in RUN_FILES if not (smoke_run / name).exists()]
    assert not missing
    assert not (smoke_run / "FAILED").exists()
    assert not list(smoke_run.glob("adapter/*.bin")), "adapters are safetensors only"


def test_smoke_metrics_are_complete_and_training_lowers_eval_loss(smoke_run: Path) -> None:
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(metrics)
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert metrics["trainable_params"] > 0 and metrics["train_tokens_per_second"] > 0


def test_resolved_config_and_provenance(smoke_run: Path) -> None:
    resolved = yaml.safe_load((smoke_run / "resolved_config.yaml").read_text())
    assert resolved["model"]["name_or_path"] == "embedded:tiny-gemma2"
    assert resolved["trainer"]["max_steps"] == 4
    provenance = json.loads((smoke_run / "provenance.json").read_text())
    assert {"git", "packages", "device", "data_fingerprint"} <= set(provenance)
    assert provenance["packages"]["torch"]
    stats = json.loads((smoke_run / "data_stats.json").read_text())
    assert stats["rows_read"] == 48 and stats["train_rows"] + stats["val_rows"] == stats["rows_kept"]
    assert "eval_loss before training" in (smoke_run / "train.log").read_text()


def test_a_failure_leaves_failed_with_the_reason(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        train_in_process(run_dir, "experiment=smoke", "data=alpaca_file", f"data.path={missing}")
    assert exit_info.value.code == ExitCode.DATA
    assert str(missing) in (run_dir / "FAILED").read_text()
    assert not (run_dir / "COMPLETED").exists()
    assert not (run_dir / ".run.lock").exists(), "the run directory is released"


def test_user_jsonl_file_trains(tmp_path: Path) -> None:
    data = tmp_path / "mine.jsonl"
    rows = [{"instruction": f"Repeat {i}.", "input": "", "output": str(i)} for i in range(20)]
    data.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    run_dir = tmp_path / "run"
    train_in_process(run_dir, "experiment=smoke", "data=alpaca_file", f"data.path={data}")
    assert (run_dir / "COMPLETED").is_file()
    assert json.loads((run_dir / "data_stats.json").read_text())["rows_read"] == 20


@pytest.mark.slow
def test_default_run_learns(tmp_path: Path) -> None:
    """`qlora-train` with no arguments (W&B offline, the default) lowers the eval loss."""
    run_dir = tmp_path / "run"
    train_in_process(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.5
    assert list((run_dir / "wandb").glob("offline-run-*")), "offline W&B files live in the run directory"


@pytest.mark.slow
def test_bf16_weights_with_an_fp32_residual_train_evaluate_and_generate(tmp_path: Path) -> None:
    """`model.fp32_residual` (the Gemma-2 preset's precision) through a whole run on the CPU."""
    run_dir = tmp_path / "run"
    train_in_process(
        run_dir,
        "experiment=smoke",
        "model.bnb_4bit_compute_dtype=bfloat16",
        "model.upcast_unquantized_params=false",
        "model.fp32_residual=true",
        "model.gradient_checkpointing=true",  # the hooks run again in the recompute, as in the preset
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    samples = (run_dir / "samples.jsonl").read_text().splitlines()
    assert len(samples) == metrics["exact_match_samples"] > 0  # generation ran through the hooks
    assert yaml.safe_load((run_dir / "resolved_config.yaml").read_text())["model"]["fp32_residual"] is True
