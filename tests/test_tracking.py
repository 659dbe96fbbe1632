"""A job's W&B run (offline, no training): named by what its sweep varies, the shared overrides as
config and tags, and its adapter logged as a model artifact; read back from the .wandb file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qlora_exp.run.context import RunContext
from qlora_exp.schema import Config, to_plain_dict, to_schema
from qlora_exp.tracking import Tracker
from tests.support import compose_config, model_artifacts, wandb_records

pytestmark = pytest.mark.slow  # each test starts an offline W&B run (seconds)

LONG_OVERRIDE = "data.path=/data/" + "x" * 60 + ".jsonl"  # longer than a W&B tag may be
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def finished_job(sweep_dir: Path) -> Path:
    """A job directory holding what a run has written by the time it logs its adapter."""
    job = sweep_dir / "lora.r=4"
    for name in ADAPTER_FILES:
        (job / "adapter").mkdir(parents=True, exist_ok=True)
        (job / "adapter" / name).write_text(f"{name}\n")
    (job / "tokenizer").mkdir()
    (job / "tokenizer" / "tokenizer.json").write_text("{}\n")
    (job / "model.safetensors").write_text("base weights, never logged\n")
    provenance = {"git": {"commit": "0123abc", "dirty": True}, "data_fingerprint": "f1ngerpr1nt"}
    (job / "provenance.json").write_text(json.dumps(provenance))
    return job


def track_job(job: Path, schema: Config) -> list[dict[str, Any]]:
    """Open the job's W&B run as a sweep job, log its adapter, close it; its .wandb records."""
    run = RunContext(job, job.parent, ("lora.r=4",), ("experiment=smoke", LONG_OVERRIDE))
    metrics = {"eval_loss": 1.5, "eval_loss_before": 2.5, "perplexity": 4.48, "train_loss": 1.2}
    with Tracker(schema.tracking, run, {"lora": {"r": 4}}) as tracker:
        tracker.log_adapter(schema, metrics)
    (run_file,) = job.glob("wandb/offline-run-*/run-*.wandb")
    return wandb_records(run_file)


def test_a_sweep_job_run_is_named_by_what_varies_and_logs_its_adapter(tmp_path: Path) -> None:
    job = finished_job(tmp_path / "sweep")
    schema = to_schema(compose_config("experiment=smoke", "tracking=wandb"))
    records = track_job(job, schema)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert (run["display_name"], run["run_group"]) == ("lora.r=4", "sweep")
    assert run["tags"] == ["experiment=smoke"]  # the long override is no tag...
    shared = run["config"]["update"]["sweep"]["shared_overrides"]
    assert shared == ["experiment=smoke", LONG_OVERRIDE]  # ...but in the config

    (artifact,) = model_artifacts(records)
    assert artifact["type"] == "model" and artifact["name"] == f"adapter-{run['run_id']}"
    files = {entry["path"]: entry["local_path"] for entry in artifact["manifest"]["contents"]}
    assert files == {
        **{f"adapter/{name}": str(job.resolve() / "adapter" / name) for name in ADAPTER_FILES},
        "tokenizer/tokenizer.json": str(job.resolve() / "tokenizer" / "tokenizer.json"),
    }
    assert json.loads(artifact["metadata"]) == {
        "base_model": schema.model.name_or_path,
        "base_model_revision": None,
        "lora": to_plain_dict(schema.lora),
        "data_fingerprint": "f1ngerpr1nt",
        "git_commit": "0123abc",
        "git_dirty": True,
        "metrics": {"eval_loss": 1.5, "eval_loss_before": 2.5, "perplexity": 4.48},
    }


def test_log_adapter_false_logs_no_artifact(tmp_path: Path) -> None:
    job = finished_job(tmp_path / "sweep")
    schema = to_schema(compose_config("experiment=smoke", "tracking=wandb", "tracking.log_adapter=false"))
    records = track_job(job, schema)
    assert [r for r in records if r["type"] == "run"]
    assert not [r for r in records if r["type"] == "artifact"]
