"""Warm start for sweeps: compiled kernels under $QLORA_EXP_CACHE/compile, the untrained model's
evaluation and generations shared between jobs that would compute the same ones (qlora_exp/baseline.py),
and the start-up time each job records."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from qlora_exp import baseline as baseline_module
from qlora_exp import cache
from qlora_exp.baseline import baseline_cache
from qlora_exp.cache import INDUCTOR_CACHE_ENV, TRITON_CACHE_ENV, configure_compile_cache
from qlora_exp.run.directory import HISTORY_FILE, METRICS, SAMPLES_FILE
from qlora_exp.schema import Config
from tests.support import train_in_process

# Two optimizer steps of the smoke run, every loss logged, held-out samples before and after.
TWO_STEPS = ("experiment=smoke", "trainer.max_steps=2", "trainer.logging_steps=1", "data.synthetic_size=24")


def read(run_dir: Path, name: str) -> Any:
    return json.loads((run_dir / name).read_text(encoding="utf-8"))


def step_losses(run_dir: Path) -> list[float]:
    return [entry["loss"] for entry in read(run_dir, HISTORY_FILE) if "loss" in entry]


def generations_before(run_dir: Path) -> list[str]:
    lines = (run_dir / SAMPLES_FILE).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["generation_before"] for line in lines]


def test_a_sweeps_next_job_reads_the_untrained_baseline_and_trains_as_if_it_had_computed_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(baseline_module, "cache_root", lambda: tmp_path / "cache")
    first, second, alone = tmp_path / "r4", tmp_path / "r8", tmp_path / "r8_alone"
    train_in_process(first, *TWO_STEPS, "lora.r=4", "trainer.learning_rate=1e-3")
    with caplog.at_level(logging.INFO, logger="qlora_exp.baseline"):
        train_in_process(second, *TWO_STEPS, "lora.r=8", "trainer.learning_rate=2e-3", "lora.alpha=8")
    read_from_cache = [r.getMessage() for r in caplog.records if "read from" in r.getMessage()]
    assert len(read_from_cache) == 2  # the evaluation and the generations before training
    train_in_process(
        alone, *TWO_STEPS, "lora.r=8", "trainer.learning_rate=2e-3", "lora.alpha=8", "baseline_cache=false"
    )
    # B = 0: another rank's untrained model computes the same evaluation, bit for bit.
    assert read(alone, METRICS)["eval_loss_before"] == read(first, METRICS)["eval_loss_before"]
    # The job that read the cache wrote what it would have computed, and then trained the same.
    for key in ("eval_loss_before", "exact_match_before"):
        assert read(second, METRICS)[key] == read(alone, METRICS)[key]
    assert generations_before(second) == generations_before(alone)
    assert step_losses(second) == step_losses(alone) and len(step_losses(alone)) == 2
    first_evaluation = next(e for e in read(second, HISTORY_FILE) if "eval_loss" in e)
    assert first_evaluation["step"] == 0
    assert first_evaluation.keys() == next(e for e in read(alone, HISTORY_FILE) if "eval_loss" in e).keys()
    startup = read(second, METRICS)
    assert 0 < startup["startup_seconds_to_train_begin"] <= startup["startup_seconds"]


def test_the_baseline_key_ignores_what_cannot_change_the_untrained_model(smoke_schema: Config) -> None:
    def key(schema: Config) -> Path | None:
        entry = baseline_cache(schema, data_key="tokenized")
        return entry.directory if entry else None

    same = key(smoke_schema)
    assert same is not None
    for free in (
        replace(smoke_schema, lora=replace(smoke_schema.lora, r=64, alpha=3, dropout=0.3, use_rslora=True)),
        replace(smoke_schema, trainer=replace(smoke_schema.trainer, learning_rate=1.0, max_steps=99)),
        replace(smoke_schema, model=replace(smoke_schema.model, compile_cache=False)),
    ):
        assert key(free) == same
    for changed in (
        replace(smoke_schema, seed=7),
        replace(smoke_schema, lora=replace(smoke_schema.lora, modules_to_save=["embed_tokens"])),
        replace(smoke_schema, model=replace(smoke_schema.model, fp32_residual=True)),
        replace(smoke_schema, eval=replace(smoke_schema.eval, max_new_tokens=5)),
        replace(smoke_schema, trainer=replace(smoke_schema.trainer, per_device_eval_batch_size=3)),
    ):
        assert key(changed) not in (same, None)
    assert baseline_cache(smoke_schema, data_key="other").directory != same
    assert key(replace(smoke_schema, baseline_cache=False)) is None
    dpo = replace(smoke_schema, method=replace(smoke_schema.method, name="dpo"))
    assert key(dpo) is None  # DPO evaluates before training itself


def test_compile_caches_go_under_the_project_cache_in_a_directory_per_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for env in (INDUCTOR_CACHE_ENV, TRITON_CACHE_ENV):
        monkeypatch.delenv(env, raising=False)  # restored afterwards
    where = configure_compile_cache(enabled=True)
    assert where is not None and where.parent == cache.cache_root() / cache.COMPILE_DIR
    assert os.environ[INDUCTOR_CACHE_ENV] == str(where)
    assert os.environ[TRITON_CACHE_ENV] == str(where / "triton")
    assert configure_compile_cache(enabled=True) == where  # a later job of the process: the same

    assert configure_compile_cache(enabled=False) is None
    assert INDUCTOR_CACHE_ENV not in os.environ  # what this process set is undone

    versions = cache.library_versions(cache.COMPILE_LIBRARIES)
    monkeypatch.setattr(cache, "library_versions", lambda names: {**versions, "transformers": "99.0"})
    assert cache.compile_cache_dir() != where  # another transformers compiles again


def test_a_compile_cache_directory_the_user_set_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, str(tmp_path / "mine"))
    monkeypatch.delenv(TRITON_CACHE_ENV, raising=False)
    assert configure_compile_cache(enabled=True) == tmp_path / "mine"
    assert os.environ[INDUCTOR_CACHE_ENV] == str(tmp_path / "mine")
    assert TRITON_CACHE_ENV not in os.environ  # torch puts Triton's kernels below the user's directory
