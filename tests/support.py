"""Shared test set-up, fixtures and helpers, a pytest plugin that tests/conftest.py loads.

Fixtures: the real composed config, shrunk; the embedded model and tokenizer built once per session;
runs in-process (`train_in_process`), console scripts called in-process with their arguments
(`run_cli_in_process`: the same entry point, parsing, Hydra and exit codes, without ~12 s of imports
per process) and, where the process itself is under test, as real processes (`run_cli`); one
finished smoke run shared by every test that only reads a run."""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from wandb.util import get_core_path

from qlora_exp.cli import imports_done
from qlora_exp.cli.train import CONF_DIR
from qlora_exp.embedded import resolve_embedded
from qlora_exp.experiment import run_job
from qlora_exp.model import build_quantized_model
from qlora_exp.run.context import RunContext
from qlora_exp.run.sweep import JobFailure
from qlora_exp.schema import Config, register_configs, to_schema

REPO = Path(__file__).resolve().parent.parent
register_configs()
# One intra-op thread in this process and in every process a test starts (torchrun, the console
# scripts): on 2 cores, OpenMP's spin-waiting between threads makes the tiny models' steps several
# times slower, and every run of the suite then computes with the same thread count (runs compared
# across processes, e.g. a resumed run against an uninterrupted one, stay comparable).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# 19 training rows, batch 2, 6 optimizer steps, a checkpoint every 2: seconds per step on a CPU.
TINY_RUN = (
    "experiment=smoke",
    "data.synthetic_size=24",
    "data.val_fraction=0.2",
    "data.max_length=96",
    "trainer.per_device_train_batch_size=2",
    "trainer.max_steps=6",
    "trainer.save_steps=2",
    "trainer.warmup_steps=0",
)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze everything the imports and the collection made (~600k objects: torch, transformers, W&B,
    the test modules) and turn the garbage collector back on, as a console script does once its imports
    are in (`qlora_exp.cli.imports_done`: a full collection walks every other tracked object, 0.4-0.5
    CPU-s with these; every run makes some). The collection's own garbage is collected first. These
    objects live until the worker exits anyway; what the tests create is collected as before."""
    gc.collect()
    imports_done()


# The longest end-to-end tests on 2 cores (their own processes: Ray, submitit, signals, torchrun; the
# default run; a cold Inductor compile), longest first: started before the other slow tests, so that
# none of them starts late and ends the run alone (README, "Tests", has their durations).
LONGEST_FIRST = (
    "tests/test_sweep_launchers.py::test_two_jobs_as_ray_tasks_on_the_cpu",
    "tests/test_requeue.py::",
    "tests/test_attention.py::test_flex_block_masks_compile_once",
    "tests/test_train_cli.py::test_default_run_learns",
    "tests/test_resume.py::",
    "tests/test_distributed.py::test_torchrun",
)


def start_order(item: pytest.Item) -> tuple[bool, int]:
    """Slow tests first, the LONGEST_FIRST ones first among them; otherwise each file's own order."""
    rank = next(
        (i for i, prefix in enumerate(LONGEST_FIRST) if item.nodeid.startswith(prefix)), len(LONGEST_FIRST)
    )
    return item.get_closest_marker("slow") is None, rank


@pytest.hookimpl(trylast=True)  # after xdist's own hook has tagged each grouped test
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """End-to-end (`slow`) tests first, the longest of them first (`start_order`), each file's tests
    otherwise in their order: `make test` runs the suite on every core (`pytest -n N --dist
    loadgroup`, each worker given the next test or xdist_group in this order), and with the long
    tests started first the short ones fill the gaps instead of one long test ending the run alone."""
    items.sort(key=start_order)
    if getattr(config.option, "loadgroup", False):  # an xdist worker under --dist loadgroup
        lost = [
            item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid
        ]
        if lost:
            raise pytest.UsageError(
                f"pytest-xdist did not tag {lost[0]} (and {len(lost) - 1} more) with its xdist_group: "
                "grouped tests would split across workers and run their shared fixtures more than once "
                "(pytest-dev/pytest-xdist#1386, pytest >= 9.2). Fix: make install (the dev extra pins pytest)"
            )


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


def train_in_process(run_dir: Path, *overrides: str) -> float | JobFailure:
    """`qlora-train OVERRIDES` in this process, in `run_dir`: what the console script runs after
    Hydra composed the config (no train.log or .hydra/ files: those are Hydra's, tested through
    `run_cli_in_process`). A failure raises SystemExit with the run's exit code, as the script exits."""
    return run_job(compose_config(*overrides), RunContext(run_dir))


@pytest.fixture
def smoke_schema() -> Config:
    """The smoke experiment as validated schema objects."""
    return to_schema(compose_config("experiment=smoke"))


@pytest.fixture(scope="session")
def tiny_tokenizer(embedded_cache: Path) -> PreTrainedTokenizerBase:
    """The embedded tiny Gemma-2's tokenizer (tests must not change it: copy it first if they do)."""
    return AutoTokenizer.from_pretrained(resolve_embedded("embedded:tiny-gemma2"))


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, embedded_cache: Path) -> Path:
    """One finished smoke run through the console script (in-process), evaluated every 2 steps, with
    held-out samples: shared by every test that only reads a finished run."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = run_cli_in_process(
        "qlora-train", "experiment=smoke", "trainer.eval_steps=2", f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert str(run_dir) in result.stdout + result.stderr
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


@dataclass(frozen=True)
class CliResult:
    """What a console script left: its exit code and what it wrote (as subprocess.CompletedProcess)."""

    returncode: int
    stdout: str
    stderr: str


def run_cli_in_process(script: str, *args: str) -> CliResult:
    """Console script `script` (as pyproject.toml installs it) called in this process with `args`.

    The same entry point, argument parsing, Hydra composition, logging set-up and exit codes as
    the installed script; stdout and stderr (logs included) are captured. Logging and Hydra's global
    state are restored afterwards so that the next test starts clean.
    """
    (entry,) = entry_points(group="console_scripts", name=script)
    main = entry.load()
    root = logging.getLogger()
    saved_handlers, saved_level, saved_argv = root.handlers[:], root.level, sys.argv
    root.handlers = []  # so the script's own logging set-up (basicConfig, Hydra's) takes effect
    sys.argv = [script, *args]
    GlobalHydra.instance().clear()
    stdout, stderr = io.StringIO(), io.StringIO()
    returncode = 0
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            try:
                main()
            except SystemExit as exc:
                returncode = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved_argv
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None  # type: ignore[assignment]
        for handler in root.handlers:
            if handler not in saved_handlers:
                handler.close()
        root.handlers = saved_handlers
        root.setLevel(saved_level)
    return CliResult(returncode, stdout.getvalue(), stderr.getvalue())


def wandb_records(run_file: Path) -> list[dict[str, Any]]:
    """The records of an offline W&B run's .wandb file, read with W&B's own inspector: W&B has no Python
    reader of the file, and `wandb leet inspect --json RUN_FILE` only finds its wandb-core binary and
    runs it with these arguments (wandb/cli/leet.py), after ~1.5 s of Python start-up; called directly
    it takes ~0.1 s."""
    run_file = run_file.resolve()  # as the command resolves it: the run file, then the wandb directory
    command = [get_core_path(), "leet", "inspect", "--no-observability", "--json"]
    command += ["--run-file", str(run_file), str(run_file.parent.parent)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def model_artifacts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `model` artifacts among a run's records (W&B logs each logged table as a `run_table` one)."""
    return [r["artifact"] for r in records if r["type"] == "artifact" and r["artifact"]["type"] == "model"]


def tiny_lora_model(name: str, attention: str = "sdpa", *overrides: str) -> peft.PeftModel:
    """The 4-bit embedded model `name` with LoRA on `attention` and `overrides`, dropout off (the same
    forward twice gives the same numbers) and LoRA's B non-zero (B starts at zero; non-zero, every
    adapter shows in the loss and the gradients)."""
    schema = to_schema(
        compose_config(
            "experiment=smoke",
            f"model.name_or_path=embedded:{name}",
            f"model.attn_implementation={attention}",
            "lora.dropout=0",
            *overrides,
        )
    )
    torch.manual_seed(0)
    model = build_quantized_model(schema.model, schema.lora)
    for parameter_name, parameter in model.named_parameters():
        if "lora_B" in parameter_name:
            torch.nn.init.normal_(parameter, std=0.1)
    return model


def loss_and_gradients(model: peft.PeftModel, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
    """The model's loss on `batch` and the gradients of its trainable parameters."""
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads
