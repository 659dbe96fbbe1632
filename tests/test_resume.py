"""End-to-end reliability: do what the failure does (real signals, SIGKILL, torn files, NaN, canary
secrets, concurrent starts) to `qlora-train` (in a subprocess where the process is what the failure
hits), then check the run, and rerun it, as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import astuple, dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from qlora_exp import experiment
from qlora_exp.errors import ExitCode
from qlora_exp.training import build_trainer
from tests.support import REPO, TINY_RUN, run_cli_in_process, train_in_process

# One worker runs the module: three tests compare against one reference run (module fixture).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("resume_reference")]

TINY = TINY_RUN
ENV_CANARIES = {"HF_TOKEN": "hf_canaryEnvToken4821", "WANDB_API_KEY": "canaryWandbKey7731aa"}
OVERRIDE_CANARY = "canaryOverrideSecret5512"


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`qlora-train ARGS` in the background, as a scheduler would start it."""
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "qlora-train"), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )


def step_history(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, loss, grad_norm) of every training step, from the final checkpoint's trainer state."""
    final = max((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((final / "trainer_state.json").read_text())["log_history"]
    return [(h["step"], h["loss"], h["grad_norm"]) for h in history if "loss" in h]


def assert_same_result(run_dir: Path, reference: Path) -> None:
    """Same adapter tensors and same per-step losses and grad norms as the uninterrupted run."""
    assert (run_dir / "COMPLETED").is_file()
    got = step_history(run_dir)
    want = step_history(reference)
    assert [s for s, _, _ in got] == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-6)
    got_metrics, want_metrics = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, reference))
    for key in ("eval_loss", "train_loss", "train_tokens"):
        assert got_metrics[key] == pytest.approx(want_metrics[key], abs=1e-6), key
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    expected = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(adapter[name], tensor, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run, W&B offline, with canary secrets in the environment and an override."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as env:
        for name, value in ENV_CANARIES.items():
            env.setenv(name, value)
        result = run_cli_in_process(
            "qlora-train",
            *TINY,
            "tracking=wandb",
            f"hydra.run.dir={run_dir}",
            f"+hub_token={OVERRIDE_CANARY}",
        )
    assert result.returncode == 0, result.stdout + result.stderr
    (run_dir / "cli_output.txt").write_text(result.stdout + result.stderr)
    return run_dir


def test_secrets_never_written(reference: Path) -> None:
    files = [p for p in reference.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".wandb" for p in files), "the W&B offline run should be among the files"
    assert any(p.name == "training_args.bin" for p in files)
    for path in files:
        data = path.read_bytes()
        for canary in (*ENV_CANARIES.values(), OVERRIDE_CANARY):
            assert canary.encode() not in data, f"{canary} leaked into {path}"
    overrides = (reference / ".hydra" / "overrides.yaml").read_text()
    assert "+hub_token=<redacted>" in overrides


def run_dir_of(runs: Path, pid: int) -> Path | None:
    """The directory under `runs` whose lock names process `pid` ("PID HOST"), once it has claimed one."""
    for lock in runs.glob("*/.run.lock"):
        try:
            owner = lock.read_text().split()  # empty for a moment: the lock is created, then written
        except FileNotFoundError:  # the other run's, released as it ended
            continue
        if owner and int(owner[0]) == pid:
            return lock.parent
    return None


# What each of the runs started together is sent, once its run directory holds that checkpoint.
INTERRUPTIONS = {signal.SIGTERM: "checkpoint-2", signal.SIGKILL: "checkpoint-4"}


@dataclass(frozen=True)
class Interrupted:
    run_dir: Path
    returncode: int
    output: str


@pytest.fixture(scope="module")
def interrupted_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[signal.Signals, Interrupted]:
    """Two runs started together with one run directory pattern (the default's, timestamped, under a
    temporary directory): one, W&B offline, gets SIGTERM once checkpoint-2 is published; the other
    SIGKILL once checkpoint-4 is. Each test reads the run of its signal; the processes are started
    once for the three tests."""
    runs = tmp_path_factory.mktemp("together") / "runs"
    pattern = f"hydra.run.dir={runs}/${{now:%H-%M-%S.%f}}"
    started = {
        signal.SIGTERM: start_cli(*TINY, "tracking=wandb", pattern),
        signal.SIGKILL: start_cli(*TINY, pattern),
    }
    run_dirs: dict[signal.Signals, Path] = {}
    waiting = set(started)
    deadline = time.monotonic() + 300
    while waiting:
        for sig in sorted(waiting):
            process = started[sig]
            assert process.poll() is None, f"run ended before {sig.name}:\n{process.communicate()[0]}"
            run_dir = run_dirs.get(sig) or run_dir_of(runs, process.pid)
            if run_dir is None:
                continue
            run_dirs[sig] = run_dir
            if (run_dir / "checkpoints" / INTERRUPTIONS[sig]).exists():
                process.send_signal(sig)
                waiting.remove(sig)
        assert time.monotonic() < deadline, f"no {INTERRUPTIONS} in {runs} after 300 s"
        time.sleep(0.1)
    return {
        sig: Interrupted(run_dirs[sig], process.wait(timeout=300), process.communicate()[0])
        for sig, process in started.items()
    }


def test_sigterm_checkpoints_exits_75_and_rerun_matches(
    reference: Path, interrupted_runs: dict[signal.Signals, Interrupted]
) -> None:
    run_dir, returncode, output = astuple(interrupted_runs[signal.SIGTERM])
    assert returncode == 75, output
    failed = (run_dir / "FAILED").read_text()
    assert "preempted by SIGTERM" in failed
    assert not (run_dir / "adapter").exists()
    run_id = (run_dir / "wandb_run_id.txt").read_text()

    rerun = run_cli_in_process("qlora-train", *TINY, "tracking=wandb", f"hydra.run.dir={run_dir}")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming" in (run_dir / "train.log").read_text()
    assert_same_result(run_dir, reference)
    assert (run_dir / "wandb_run_id.txt").read_text() == run_id  # the W&B run continues
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(p.name.endswith(run_id.strip()) for p in offline_runs)


def test_sigkill_then_torn_checkpoint_resumes_from_last_complete(
    reference: Path, interrupted_runs: dict[signal.Signals, Interrupted]
) -> None:
    run_dir, returncode, output = astuple(interrupted_runs[signal.SIGKILL])
    assert returncode == -signal.SIGKILL, output
    newest = run_dir / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a torn write

    rerun = run_cli_in_process("qlora-train", *TINY, f"resume={run_dir}")  # the other way to name the run
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    log = (run_dir / "train.log").read_text()
    assert "skipping checkpoint" in log and "checkpoint-4: adapter_model.safetensors has 100 bytes" in log
    assert f"resuming {run_dir} from {run_dir}/checkpoints/checkpoint-2" in log
    assert "removing stale lock" in log
    assert_same_result(run_dir, reference)


class PoisonLora(TrainerCallback):
    """Writes NaN into one LoRA weight as step `step` begins: the fault the guard is for."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs) -> None:
        if state.global_step + 1 == self.step:
            weight = next(p for n, p in model.named_parameters() if "lora_A" in n)
            with torch.no_grad():
                weight[0, 0] = float("nan")


def test_non_finite_loss_stops_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def build_poisoned_trainer(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        trainer.add_callback(PoisonLora(step=2))
        return trainer

    monkeypatch.setattr(experiment, "build_trainer", build_poisoned_trainer)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train_in_process(run_dir, *TINY, "trainer.max_steps=3")
    assert exit_info.value.code == ExitCode.NUMERICAL
    failed = (run_dir / "FAILED").read_text()
    assert "NumericalError: step 2: loss or gradient norm is nan" in failed
    assert "trainer.nan_guard_patience=1" in failed
    assert not (run_dir / "adapter").exists() and not (run_dir / "COMPLETED").exists()
    assert not list((run_dir / "checkpoints").glob("checkpoint-*"))  # step 2 would have saved one


def test_the_first_run_on_a_cold_cache_trains_like_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first run builds the embedded model inside the run, after seeding; the second loads it.
    monkeypatch.setenv("QLORA_EXP_CACHE", str(tmp_path / "empty_cache"))
    overrides = (*TINY, "trainer.max_steps=3", "eval.num_samples=0")
    train_in_process(tmp_path / "cold", *overrides)
    train_in_process(tmp_path / "warm", *overrides)
    assert list((tmp_path / "empty_cache" / "embedded").iterdir())
    cold, warm = (json.loads((tmp_path / run / "log_history.json").read_text()) for run in ("cold", "warm"))
    steps = [(h["step"], h["loss"], h["grad_norm"]) for h in cold if "loss" in h]
    assert [step for step, _, _ in steps] == [1, 2, 3]
    assert steps == [(h["step"], h["loss"], h["grad_norm"]) for h in warm if "loss" in h]


def test_two_runs_started_together_get_their_own_directories(
    interrupted_runs: dict[signal.Signals, Interrupted],
) -> None:
    # The two runs of `interrupted_runs`: one directory pattern, started at the same moment.
    term, kill = (interrupted_runs[sig].run_dir for sig in (signal.SIGTERM, signal.SIGKILL))
    assert term != kill and sorted(term.parent.iterdir()) == sorted([term, kill])
    for run_dir in (term, kill):
        assert (run_dir / "resolved_config.yaml").is_file()
    # each wrote only its own run: its own settings, and checkpoints up to where it was stopped
    assert yaml.safe_load((term / "resolved_config.yaml").read_text())["tracking"]["backend"] == "wandb"
    assert yaml.safe_load((kill / "resolved_config.yaml").read_text())["tracking"]["backend"] == "none"
    assert (term / "wandb_run_id.txt").is_file() and not (kill / "wandb_run_id.txt").exists()
    assert [interrupted_runs[sig].returncode for sig in (signal.SIGTERM, signal.SIGKILL)] == [75, -9]
