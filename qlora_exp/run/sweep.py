"""Sweep mechanics on top of Hydra's multirun: stable job directories, skipping finished jobs,
containing one job's failure, and the end-of-sweep summary.

Hydra's sweepers and launchers (basic, joblib, submitit, Ray, Optuna) do the scheduling; this
module only adds what they leave to the application.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.core.utils import configure_log
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from qlora_exp.errors import ExitCode
from qlora_exp.run.context import RunContext
from qlora_exp.run.directory import (
    COMPLETED,
    FAILED,
    METRICS,
    RESOLVED_CONFIG,
    RunDirectory,
    config_diff,
    redact_secrets,
)

log = logging.getLogger(__name__)

JOB_DIRNAME_RESOLVER = "job_dirname"
MAX_DIRNAME = 150  # well under the 255-byte limit of one path component
INCOMPLETE = "INCOMPLETE"


def job_dirname(override_dirname: str, num: int) -> str:
    """A job's sweep subdirectory, named by its overrides so that a rerun of the same sweep
    command maps each job to the same directory (Optuna restarts `hydra.job.num` at 0 on every
    invocation, so the job number is not stable there)."""
    name = override_dirname.replace("/", "%2F") or f"job_{num}"
    if len(name) > MAX_DIRNAME:
        digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:10]
        name = f"{name[: MAX_DIRNAME - 11]}-{digest}"
    return name


def register_sweep_configs() -> None:
    """The `job_dirname` resolver that conf/config.yaml names job directories with."""
    OmegaConf.register_new_resolver(JOB_DIRNAME_RESOLVER, job_dirname, replace=True)


def finished_objective(run: RunContext, resolved: dict[str, Any]) -> float | None:
    """In a sweep, the eval_loss of this job's earlier COMPLETED run with the same resolved
    config (the job is then skipped, before any data or model loads); None when it must run."""
    run_dir = run.path
    if not run.in_sweep or not (run_dir / COMPLETED).is_file():
        return None
    stored = yaml.safe_load((run_dir / RESOLVED_CONFIG).read_text(encoding="utf-8"))
    differences = list(config_diff(stored, redact_secrets(resolved)))
    if differences:
        log.warning("rerunning %s: resolved config changed at %s", run_dir, ", ".join(differences))
        return None
    metrics = json.loads((run_dir / METRICS).read_text(encoding="utf-8"))
    log.info("skipping %s: COMPLETED with the same resolved config", run_dir)
    return float(metrics["eval_loss"])


@dataclass(frozen=True)
class JobFailure:
    """What a failed sweep job returns to the sweeper instead of raising.

    Hydra's BasicSweeper re-raises the first job exception after the batch, which skips
    `on_multirun_end` (so no summary); the Optuna sweeper records a non-float return as a
    failed trial and goes on. The run directory already says FAILED and why.
    """

    exit_code: int
    reason: str

    def __str__(self) -> str:
        return f"job failed (exit {self.exit_code}): {self.reason}"


def end_failed_job(exit_code: int, exc: BaseException, run: RunContext) -> JobFailure:
    """A single run exits with `exit_code`; inside a sweep the failure is returned so the
    remaining jobs run (the sweep exits non-zero at its end, see `SweepSummary`)."""
    if not run.in_sweep:
        raise SystemExit(exit_code) from exc
    reason = f"{type(exc).__name__}: {exc}"
    if not (run.path / FAILED).is_file():  # failed before claiming its directory, e.g. a bad override
        RunDirectory(run.path).mark_failed(reason)
    return JobFailure(int(exit_code), reason)


@dataclass(frozen=True)
class JobState:
    """One job directory of a sweep and how it ended."""

    path: Path
    status: str  # COMPLETED | FAILED | INCOMPLETE
    reason: str = ""


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job directory under a sweep directory (each holds Hydra's .hydra/overrides.yaml)."""
    return sorted(p.parent.parent for p in sweep_dir.rglob("overrides.yaml") if p.parent.name == ".hydra")


def job_state(path: Path) -> JobState:
    """COMPLETED or FAILED (with the reason) from the run's marker, else INCOMPLETE."""
    if (path / COMPLETED).is_file():
        return JobState(path, COMPLETED)
    if (path / FAILED).is_file():
        return JobState(path, FAILED, (path / FAILED).read_text(encoding="utf-8").strip())
    return JobState(path, INCOMPLETE, "no COMPLETED or FAILED marker: running, killed, or never started")


class SweepSummary(Callback):
    """Hydra callback (registered in conf/config.yaml under hydra.callbacks): prepares the sweep
    directory, and at the end of a sweep logs every job's state and exits non-zero if any failed."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        # The Optuna sweeper opens its SQLite storage inside the sweep dir before any job makes it.
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # Logging still points at the last job's train.log; go back to Hydra's own console setup.
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
        sweep_dir = Path(config.hydra.sweep.dir)
        # Hydra rewrites a job's .hydra/ files whenever it launches the job (skipped ones too), so
        # older files belong to jobs of an earlier invocation (an old grid, Optuna's past trials).
        launched = [
            p
            for p in find_job_dirs(sweep_dir)
            if (p / ".hydra" / "overrides.yaml").stat().st_mtime >= self.started
        ]
        states = [job_state(path) for path in launched]
        bad = [s for s in states if s.status != COMPLETED]
        log.info(
            "sweep %s: %d jobs, %d COMPLETED, %d not",
            sweep_dir,
            len(states),
            len(states) - len(bad),
            len(bad),
        )
        for state in bad:
            log.error("  %s %s: %s", state.status, state.path.relative_to(sweep_dir), state.reason)
        if bad:
            log.error("compare what finished: qlora-compare %s", sweep_dir)
            raise SystemExit(ExitCode.SWEEP_JOBS_FAILED)
