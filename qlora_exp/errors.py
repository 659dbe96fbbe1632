"""Exceptions a run can end with, each tied to a documented process exit code."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from typing import Any

import torch

log = logging.getLogger(__name__)


class ExitCode(IntEnum):
    """Process exit codes of `qlora-train` (documented in the README)."""

    OK = 0
    CONFIG = 1  # Hydra's own compose errors (unknown key, wrong type) exit 1 as well
    DATA = 3
    NUMERICAL = 4
    OUT_OF_MEMORY = 5
    RUN_DIR = 6
    OTHER = 7
    SWEEP_JOBS_FAILED = 8  # multirun: some jobs FAILED or did not finish; the others ran
    SYNC_FAILED = 9  # qlora-sync: some W&B runs did not sync; the others did
    PREEMPTED = 75  # EX_TEMPFAIL: rerun the same command to resume


class QloraError(Exception):
    """Base class: a failure we understand, with a message naming the cause and the fix."""

    exit_code: ExitCode = ExitCode.OTHER


class ConfigError(QloraError):
    """The composed configuration is invalid or impossible."""

    exit_code = ExitCode.CONFIG


class DataError(QloraError):
    """The data cannot be read or yields no usable example."""

    exit_code = ExitCode.DATA


class NumericalError(QloraError):
    """Loss or gradient norm became NaN or infinite."""

    exit_code = ExitCode.NUMERICAL


class OutOfMemoryError(QloraError):
    """The accelerator ran out of memory."""

    exit_code = ExitCode.OUT_OF_MEMORY


class RunDirectoryError(QloraError):
    """The run directory is in use by another process or cannot be written."""

    exit_code = ExitCode.RUN_DIR


class SyncError(QloraError):
    """Some offline W&B runs did not sync (`qlora-sync`); rerunning syncs only those."""

    exit_code = ExitCode.SYNC_FAILED


class PreemptedError(QloraError):
    """A preemption signal arrived; a checkpoint was saved and the same command resumes the run."""

    exit_code = ExitCode.PREEMPTED


class RequeuedExit(SystemExit):
    """submitit's own exit after it requeued the job (same exit code), with a reason that the run
    directory's FAILED marker shows until the requeued job reopens the directory."""

    def __init__(self, code: Any, reason: str) -> None:
        super().__init__(code)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def exit_code_for(exc: BaseException) -> ExitCode:
    """The documented exit code a failure ends a command with: every console script maps through
    this one function (`qlora-train` via `experiment.run_job`, the others via `exit_on_error`)."""
    if isinstance(exc, QloraError):
        return exc.exit_code
    if isinstance(exc, torch.OutOfMemoryError):
        return ExitCode.OUT_OF_MEMORY
    return ExitCode.OTHER


@contextmanager
def exit_on_error() -> Iterator[None]:
    """End a failure we understand (a QloraError, CUDA out of memory) with its documented exit code
    (`exit_code_for`) and a one-line message; anything else propagates with its traceback."""
    try:
        yield
    except (QloraError, torch.OutOfMemoryError) as exc:
        log.error("%s", exc)
        raise SystemExit(exit_code_for(exc)) from exc
