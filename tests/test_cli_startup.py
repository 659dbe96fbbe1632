"""Console-script start-up: Python's cyclic garbage collector is off while a script imports its
libraries and back on, with the imports frozen, before the script does anything (`qlora_exp.cli`)."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.support import REPO, run_cli_in_process

SCRIPTS = sorted(
    ep.name for ep in entry_points(group="console_scripts") if ep.value.startswith("qlora_exp.cli.")
)


@pytest.fixture
def collector_off() -> Iterator[None]:
    """The collector as a fresh script process has it while it imports: off (and on again after)."""
    gc.disable()
    yield
    gc.enable()


def test_importing_the_cli_package_turns_the_collector_off_until_a_script_starts() -> None:
    code = (
        "import gc; assert gc.isenabled(); import qlora_exp.cli as cli; print(gc.isenabled()); "
        "frozen = gc.get_freeze_count(); cli.imports_done(); "
        "print(gc.isenabled(), gc.get_freeze_count() > frozen)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "True"]


def test_every_console_script_of_the_package_is_checked() -> None:
    """pyproject.toml's scripts, as installed (none found would leave the test below without cases)."""
    names = ("bench", "chat", "compare", "generate", "merge", "sync", "train")
    assert [f"qlora-{name}" for name in names] == SCRIPTS


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "qlora-train"])
def test_each_script_turns_the_collector_back_on_first(script: str, collector_off: None) -> None:
    result = run_cli_in_process(script, "--help")  # parsed after the collector is back on
    assert result.returncode == 0, result.stderr
    assert gc.isenabled()


def test_a_training_job_runs_with_the_collector_on(tmp_path: Path, collector_off: None) -> None:
    """Hydra's task function (what submitit, Ray and joblib run in their job processes) turns it on."""
    missing = tmp_path / "nope.jsonl"
    args = (
        "experiment=smoke",
        "data=alpaca_file",
        f"data.path={missing}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    result = run_cli_in_process("qlora-train", *args)  # fails on the data, after the job started
    assert result.returncode != 0 and str(missing) in (tmp_path / "run" / "FAILED").read_text()
    assert gc.isenabled()
