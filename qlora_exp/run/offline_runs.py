"""The offline W&B runs under a directory (a sweep's jobs and its comparison run, or one run) and
syncing them through wandb's own `wandb sync`, several runs at once.

Each W&B run is synced by its own `wandb sync` process: its exit status and wandb's `.synced`
markers then say exactly which run failed (wandb's own `-n` parallelism reports failures only as
printed messages), and one failing run does not stop the others.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)

OFFLINE_RUN_GLOB = "offline-run-*"  # wandb's folder per offline run attempt, inside a `wandb/` directory
TRANSACTION_LOG_GLOB = "run-*.wandb"
# `wandb sync` writes run-ID.wandb.synced beside each file it uploaded and skips such files later.
SYNCED_SUFFIX = ".synced"
OUTPUT_TAIL_LINES = 8


@dataclass(frozen=True)
class OfflineRun:
    """One W&B run and its offline folders, oldest first: each attempt of a resumed run (or each
    `qlora-compare --wandb`) adds a folder with the same run id, which `wandb sync` joins in order."""

    run_id: str
    folders: tuple[Path, ...]

    @property
    def pending(self) -> tuple[Path, ...]:
        """The folders wandb has not marked synced (read from disk at each call)."""
        return tuple(folder for folder in self.folders if not is_synced(folder))


def transaction_logs(folder: Path) -> list[Path]:
    """The .wandb files of an offline run folder."""
    return sorted(folder.glob(TRANSACTION_LOG_GLOB))


def is_synced(folder: Path) -> bool:
    """Whether `wandb sync` marked every .wandb file of the folder synced."""
    return all(path.with_name(path.name + SYNCED_SUFFIX).is_file() for path in transaction_logs(folder))


def find_offline_runs(root: Path) -> list[OfflineRun]:
    """Every offline W&B run under `root`, once each (its folders grouped by run id), in path order."""
    folders: dict[str, list[Path]] = {}
    for folder in sorted(root.rglob(OFFLINE_RUN_GLOB)):
        logs = transaction_logs(folder) if folder.is_dir() and folder.parent.name == "wandb" else []
        if logs:
            run_id = logs[0].name.removeprefix("run-").removesuffix(".wandb")
            folders.setdefault(run_id, []).append(folder)
    # the folder name starts offline-run-YYYYMMDD_HHMMSS: by name is by start time
    return [
        OfflineRun(run_id, tuple(sorted(group, key=lambda f: f.name))) for run_id, group in folders.items()
    ]


def sync_command(wandb_command: list[str], run: OfflineRun) -> list[str]:
    """`wandb sync` of the run's folders that are not synced yet, oldest first."""
    return [*wandb_command, "sync", *(str(folder) for folder in run.pending)]


@dataclass(frozen=True)
class SyncResult:
    """How one run's `wandb sync` ended; `error` is None when every folder is marked synced."""

    run: OfflineRun
    command: list[str]
    error: str | None


def _tail(text: str) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-OUTPUT_TAIL_LINES:] if line.strip())


def sync_run(run: OfflineRun, wandb_command: list[str]) -> SyncResult:
    """Run `wandb sync` for one run; success needs exit status 0 and wandb's `.synced` markers
    (without credentials wandb prints "Not authenticated." and exits 0 without syncing)."""
    command = sync_command(wandb_command, run)
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:  # the executable is missing or not executable
        return SyncResult(run, command, f"cannot run {command[0]}: {exc}")
    output = _tail(done.stdout + "\n" + done.stderr)
    if done.returncode != 0:
        return SyncResult(run, command, f"exit {done.returncode}: {output}")
    if run.pending:
        left = ", ".join(folder.name for folder in run.pending)
        return SyncResult(
            run,
            command,
            f"wandb sync exited 0 but did not mark {left} synced (logged in? `wandb login`): {output}",
        )
    return SyncResult(run, command, None)


def sync_runs(runs: list[OfflineRun], wandb_command: list[str], jobs: int) -> Iterator[SyncResult]:
    """Sync `runs`, `jobs` at a time, with a progress bar; yields each result as it finishes."""
    with (
        ThreadPoolExecutor(max_workers=jobs) as pool,
        logging_redirect_tqdm(),
        tqdm(total=len(runs), unit="run", desc="wandb sync") as progress,
    ):
        futures = [pool.submit(sync_run, run, wandb_command) for run in runs]
        for future in as_completed(futures):
            progress.update()
            yield future.result()
