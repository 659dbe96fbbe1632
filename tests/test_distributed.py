"""Data-parallel QLoRA on the CPU: torchrun with 2 processes over gloo, one shared run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import REPO, run_cli


@pytest.mark.slow
def test_torchrun_two_cpu_processes_share_one_run_and_agree(tmp_path: Path) -> None:
    result = run_cli(
        "torchrun",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "qlora_exp.cli.train",
        "experiment=smoke",
        "model.gradient_checkpointing=true",  # DDP over checkpointed layers, as every real preset trains
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dirs = [p.parent for p in (tmp_path / "outputs" / "runs").glob("*/*/.hydra")]
    assert len(run_dirs) == 1, f"all ranks must share one run directory, got {run_dirs}"
    run_dir = run_dirs[0]
    assert (run_dir / "COMPLETED").exists() and (run_dir / "adapter" / "adapter_model.safetensors").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["effective_batch_size"] == 4 * 1 * 2  # smoke: per-device 4, accumulation 1, 2 ranks
    assert metrics["ranks_agree"] is True
    assert metrics["train_steps"] == 4
    assert (run_dir / "train.log").read_text().count("COMPLETED") == 1, "only rank 0 logs at INFO"
