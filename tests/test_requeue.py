"""Preemption and timeout under submitit: the checkpoint is saved at a step boundary, then submitit's
own handler requeues the job, which resumes in the same job directory from that checkpoint. The
end-to-end sweep through submitit's local executor (the grid preset's two jobs, one of them
preempted) is shared with the launcher test that reads its jobs."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher
from submitit.core.utils import DelayedSubmission, JobPaths
from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE, LocalJobEnvironment
from transformers import TrainerControl, TrainerState, TrainingArguments

from qlora_exp.errors import PreemptedError, RequeuedExit
from qlora_exp.guards import PreemptionCallback, submitit_signal
from tests.support import CliResult, run_cli_in_process
from tests.test_sweep_launchers import completed_jobs

LAUNCHER_ARGS = (["lora.r=8"], "hydra.sweep.dir", 0, "job_id_for_0", {})
SIGNALS_TOUCHED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT)  # ours and submitit's


@pytest.fixture
def submitit_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[JobPaths]:
    """This process as task 0 of a submitit-local job running the Hydra launcher, with submitit's
    signal handlers installed as `python -m submitit.core._submit` installs them."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "4242")
    monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", "0")
    paths = JobPaths(tmp_path / "submitit", job_id="4242", task_id=0)
    paths.folder.mkdir(parents=True)
    before = {sig: signal.getsignal(sig) for sig in SIGNALS_TOUCHED}
    yield paths
    for sig, handler in before.items():
        signal.signal(sig, handler)


def install_submitit_handlers(paths: JobPaths, timeout_min: int, countdown: int) -> None:
    delayed = DelayedSubmission(LocalLauncher(), *LAUNCHER_ARGS)
    delayed.set_timeout(timeout_min, countdown)
    LocalJobEnvironment()._handle_signals(paths, delayed)


def preempt_at_step_3(tmp_path: Path) -> tuple[PreemptionCallback, TrainingArguments, TrainerState]:
    """A callback that got submitit's signal during step 3 and is asked to save at its end."""
    callback = PreemptionCallback()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    state = TrainerState(global_step=3, max_steps=6)
    callback.on_train_begin(args, state, TrainerControl())
    signal.raise_signal(signal.SIGUSR2)
    assert callback.signal_name == "SIGUSR2"
    control = callback.on_step_end(args, state, TrainerControl())
    assert control.should_save and control.should_training_stop
    return callback, args, state


def test_submitit_signal_is_caught_only_inside_a_submitit_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert submitit_signal() is None
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert submitit_signal() == signal.SIGUSR2


# Submitit's handler tells preemption from timeout by the job's wall time against timeout_min (a
# 1-minute job has always run out of time); only timeouts count against max_num_timeout.
@pytest.mark.parametrize(("timeout_min", "countdown_after"), [(60, 3), (1, 2)], ids=["preempted", "timeout"])
def test_after_the_checkpoint_submitit_resubmits_the_same_job_and_requeues_it(
    submitit_job: JobPaths, tmp_path: Path, timeout_min: int, countdown_after: int
) -> None:
    install_submitit_handlers(submitit_job, timeout_min, countdown=3)
    submitit_handler = signal.getsignal(signal.SIGUSR2)
    callback, args, state = preempt_at_step_3(tmp_path)
    with pytest.raises(RequeuedExit) as info:
        callback.on_save(args, state, TrainerControl())
    # submitit's own exit code: its local executor reruns the job; on SLURM it ran `scontrol requeue`
    assert info.value.code == LOCAL_REQUEUE_RETURN_CODE
    assert str(info.value) == "requeued by submitit after SIGUSR2: checkpoint saved at step 3 of 6"
    assert signal.getsignal(signal.SIGUSR2) is submitit_handler  # handed back
    # The launcher's checkpoint(): the same call (same overrides, so the same job directory).
    requeued = DelayedSubmission.load(submitit_job.submitted_pickle)
    assert isinstance(requeued.function, LocalLauncher)
    assert requeued.args == LAUNCHER_ARGS
    assert requeued._timeout_countdown == countdown_after


def test_timed_out_too_often_is_a_preemption_with_a_fix(submitit_job: JobPaths, tmp_path: Path) -> None:
    install_submitit_handlers(submitit_job, timeout_min=1, countdown=0)
    callback, args, state = preempt_at_step_3(tmp_path)
    with pytest.raises(PreemptedError, match=r"step 3 of 6; submitit did not requeue .*timed-out too many"):
        callback.on_save(args, state, TrainerControl())


# The sweep of the slow tests below: the grid preset's two jobs through submitit's local executor,
# long enough (seconds of steps) for the signal to land mid-training in the job it preempts.
MAX_STEPS = 24
PREEMPTED = "lora.r=8"
Sweep = tuple[Path, CliResult]


def preempt_after_first_checkpoint(job_dir: Path, sweep_ended: threading.Event, timeout: float = 300) -> None:
    """Send SIGUSR2 to the job process that runs in `job_dir` (what submitit's `job._interrupt()` and
    SLURM send) once the job's first checkpoint is published (checkpoints appear atomically)."""
    deadline = time.monotonic() + timeout
    while not list(job_dir.glob("checkpoints/checkpoint-*")):
        assert not sweep_ended.is_set(), f"the sweep ended before a checkpoint in {job_dir}"
        assert time.monotonic() < deadline, f"no checkpoint in {job_dir} after {timeout} s"
        time.sleep(0.1)
    job_pid = int((job_dir / ".run.lock").read_text().split()[0])  # "PID HOST" of the job's process
    os.kill(job_pid, signal.SIGUSR2)


@pytest.fixture(scope="module")
def submitit_sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """`qlora-train -m experiment=[rank_lr_grid,smoke] lora.r=4,8 hydra/launcher=submitit_local`:
    the sweep's own process is this one, submitit starts a process per job; job lora.r=8 is
    preempted (SIGUSR2) after its first checkpoint, from a thread, while this one runs the sweep.
    Both slow tests read this one sweep."""
    sweep_dir = tmp_path_factory.mktemp("submitit") / "sweep"
    sweep_ended = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        preempted = pool.submit(preempt_after_first_checkpoint, sweep_dir / PREEMPTED, sweep_ended)
        try:
            result = run_cli_in_process(
                "qlora-train",
                "-m",
                "experiment=[rank_lr_grid,smoke]",
                # The preset's own lists are replaced by the command line's, as in any Hydra sweep.
                "lora.r=4,8",
                "trainer.learning_rate=1e-3",
                "data.synthetic_size=24",
                "eval.num_samples=0",
                f"trainer.max_steps={MAX_STEPS}",
                "trainer.save_steps=2",
                "hydra/launcher=submitit_local",
                f"hydra.sweep.dir={sweep_dir}",
            )
        finally:
            sweep_ended.set()
        preempted.result()  # the signal was sent (or why not)
    return sweep_dir, result


@pytest.mark.slow
@pytest.mark.xdist_group("submitit_sweep")  # one worker runs both tests of the shared sweep
def test_grid_preset_runs_two_jobs_with_submitit_local_executor(
    submitit_sweep: Sweep,
) -> None:
    sweep_dir, result = submitit_sweep
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    jobs = completed_jobs(sweep_dir)
    # named by what varies, also when the launcher composes each job's config for another process
    assert [job.name for job in jobs] == ["lora.r=4", "lora.r=8"]
    assert list((sweep_dir / ".submitit").iterdir())  # the jobs ran through submitit
    for job in jobs:
        assert yaml.safe_load((job / "resolved_config.yaml").read_text())["tracking"]["tags"] == [
            "rank_lr_grid"
        ]


@pytest.mark.slow
@pytest.mark.xdist_group("submitit_sweep")
def test_preempted_submitit_job_is_requeued_and_resumes_from_its_checkpoint(
    submitit_sweep: Sweep,
) -> None:
    sweep_dir, result = submitit_sweep
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    job_dir = sweep_dir / PREEMPTED
    assert (job_dir / "COMPLETED").is_file() and not (job_dir / "FAILED").exists()
    # submitit's own log of the job: requeued once by submitit, then started again by its executor
    (submitit_log,) = [
        text
        for text in (p.read_text() for p in (sweep_dir / ".submitit").glob("*/*_0_log.out"))
        if f"run directory: {job_dir}" in text
    ]
    assert "Requeued job" in submitit_log and submitit_log.count("Starting with JobEnvironment") == 2
    log = (job_dir / "train.log").read_text()
    saved = re.search(
        rf"SIGUSR2: checkpoint saved at step (\d+) of {MAX_STEPS}; "
        r"handing over to submitit to requeue the job",
        log,
    )
    resumed = re.search(r"resuming .* from .*/checkpoint-(\d+)\n", log)
    assert saved and resumed, log[-3000:]
    assert (
        "run FAILED" not in log and "run requeued by submitit after SIGUSR2: checkpoint saved at step" in log
    )
    step = int(resumed.group(1))
    assert 0 < step < MAX_STEPS and step == int(saved.group(1))
    # The requeued job trained only the remaining steps: every checkpoint it saved comes later.
    after = [int(s) for s in re.findall(r"saved \(step (\d+)\)", log[resumed.end() :])]
    assert after and min(after) > step
    assert json.loads((job_dir / "metrics.json").read_text())["train_steps"] == MAX_STEPS
