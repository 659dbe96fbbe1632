"""qlora-sync DIR: upload every offline W&B run under a sweep (or run) directory with `wandb sync`,
several runs at once, skipping runs wandb already marked synced."""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
from pathlib import Path

from qlora_exp.cli import imports_done
from qlora_exp.cli.common import configure_cli_logging
from qlora_exp.errors import SyncError, exit_on_error
from qlora_exp.run.offline_runs import find_offline_runs, sync_command, sync_runs

log = logging.getLogger(__name__)

DEFAULT_JOBS = 4  # uploads are network-bound: a few at once


def default_wandb_command() -> str:
    """The `wandb` script of the Python that runs qlora-sync (the wandb it logged with), else PATH's."""
    beside = Path(sys.executable).parent / "wandb"
    return str(beside) if beside.is_file() else shutil.which("wandb") or "wandb"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    """Console entry point of `qlora-sync`."""
    imports_done()
    parser = argparse.ArgumentParser(prog="qlora-sync", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="a hydra.sweep.dir (jobs, comparison run) or a run dir")
    parser.add_argument("--jobs", "-j", type=positive_int, default=DEFAULT_JOBS, help="runs synced at once")
    parser.add_argument("--dry-run", action="store_true", help="print the wandb sync commands, run nothing")
    parser.add_argument(
        "--wandb-command",
        default=default_wandb_command(),
        help="the wandb executable, with leading arguments if any (default: the wandb beside this Python)",
    )
    args = parser.parse_args(argv)
    configure_cli_logging()
    if not args.directory.is_dir():
        parser.error(f"{args.directory} is not a directory. Fix: pass a hydra.sweep.dir or a run directory")
    runs = find_offline_runs(args.directory)
    if not runs:
        parser.error(
            f"no offline W&B runs under {args.directory} (they are RUN_DIR/wandb/offline-run-*). "
            "Fix: pass the directory of runs made with tracking=wandb (offline, the default)"
        )
    pending = [run for run in runs if run.pending]
    skipped = len(runs) - len(pending)
    log.info("%d offline W&B runs: %d already synced (skipped), %d to sync", len(runs), skipped, len(pending))
    wandb_command = shlex.split(args.wandb_command)
    if args.dry_run:
        for run in pending:
            print(shlex.join(sync_command(wandb_command, run)))  # the command's output: what it would run
        return
    with exit_on_error():
        failed = []
        for result in sync_runs(pending, wandb_command, args.jobs):
            if result.error is not None:
                failed.append(result)
                log.error("run %s did not sync: %s", result.run.run_id, result.error)
        synced = len(pending) - len(failed)
        log.info("synced %d of %d runs (%d were already synced)", synced, len(pending), skipped)
        if failed:
            raise SyncError(
                f"{len(failed)} of {len(pending)} runs did not sync: "
                f"{', '.join(result.run.run_id for result in failed)}. Fix: see each run's error above "
                "(`wandb login`, network), then rerun qlora-sync: synced runs are skipped"
            )


if __name__ == "__main__":
    main()
