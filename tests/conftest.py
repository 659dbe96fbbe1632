"""Shared fixtures: the real composed config, shrunk; the embedded model built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from qlora_exp.schema import Config, register_configs, to_schema
from qlora_exp.train import CONF_DIR

REPO = Path(__file__).resolve().parent.parent
register_configs()


@pytest.fixture(scope="session", autouse=True)
def embedded_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One embedded-model cache for the whole session (tests and the CLIs they start)."""
    cache = Path(os.environ.get("QLORA_EXP_TEST_CACHE") or tmp_path_factory.mktemp("qlora_cache"))
    previous = os.environ.get("QLORA_EXP_CACHE")
    os.environ["QLORA_EXP_CACHE"] = str(cache)
    os.environ.setdefault("WANDB_SILENT", "true")
    yield cache
    if previous is None:
        os.environ.pop("QLORA_EXP_CACHE", None)
    else:
        os.environ["QLORA_EXP_CACHE"] = previous


def compose_config(*overrides: str) -> DictConfig:
    """The real config tree with `overrides`, composed as `qlora-train` would (no run)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def smoke_schema() -> Config:
    """The smoke experiment as validated schema objects."""
    return to_schema(compose_config("experiment=smoke"))


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, embedded_cache: Path) -> Path:
    """One finished smoke run (no held-out samples) shared by the tests that only read a run."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = run_cli("qlora-train", "experiment=smoke", "eval.num_samples=0", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run an installed console script (or `python -m`) the way a user would, capturing output."""
    command = [str(Path(sys.executable).parent / args[0]), *args[1:]]
    return subprocess.run(
        command,
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )
