"""qlora-compare SWEEP_DIR: compare the jobs of a sweep from their run directories.

Writes comparison.csv and comparison.md (one row per job, best first) and PNG plots (loss curves
of every job; a heatmap of the metric over two swept parameters) into the sweep directory;
`--wandb` also logs them as the sweep's own W&B run. `--diff RUN_A RUN_B` shows two runs'
resolved-config differences and metrics side by side instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from qlora_exp.cli import imports_done
from qlora_exp.cli.common import configure_cli_logging
from qlora_exp.comparison.jobs import RunDiff, diff_runs
from qlora_exp.comparison.table import Comparison, build_comparison, write_comparison
from qlora_exp.comparison.wandb_run import log_comparison_run
from qlora_exp.errors import exit_on_error
from qlora_exp.run.sweep import find_job_dirs

DEFAULT_METRIC = "eval_loss"


def print_comparison(comparison: Comparison) -> None:
    """The per-job table, mean ± std over seeds, and the best run, on stdout."""
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_colwidth", 60):
        print(comparison.table.drop(columns=["note"]).to_string(index=False))
        if comparison.seeds is not None:
            print("\nmean ± std over seeds:\n" + comparison.seeds.to_string(index=False))
    print(comparison.best)


def print_diff(diff: RunDiff) -> None:
    """Two runs' differing config keys, then their metrics, on stdout."""
    print(f"A: {diff.first.path} ({diff.first.status})\nB: {diff.second.path} ({diff.second.status})\n")
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_colwidth", 60):
        if diff.config.empty:
            print("resolved configs: identical")
        else:
            print(f"resolved config keys that differ: {len(diff.config)}")
            print(diff.config.to_string(index=False))
        if not diff.metrics.empty:
            print(f"\nmetrics:\n{diff.metrics.to_string(index=False)}")


def run_path(name: Path, sweep_dir: Path | None) -> Path:
    """RUN as given, or a job of SWEEP_DIR by its name (`qlora-compare SWEEP --diff lora.r=4 lora.r=8`)."""
    if sweep_dir is not None and (sweep_dir / name).is_dir():
        return sweep_dir / name
    return name


def main(argv: list[str] | None = None) -> None:
    """Console entry point of `qlora-compare`."""
    imports_done()
    parser = argparse.ArgumentParser(prog="qlora-compare", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, nargs="?", help="hydra.sweep.dir of a `qlora-train -m` run")
    parser.add_argument("--metric", help=f"metrics.json key to rank by ({DEFAULT_METRIC})")
    parser.add_argument("--maximize", action="store_true", help="higher is better (e.g. tokens/s)")
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="also log the comparison as the sweep's W&B run (job_type comparison, the jobs' group)",
    )
    parser.add_argument(
        "--diff",
        nargs=2,
        type=Path,
        metavar=("RUN_A", "RUN_B"),
        help="the resolved-config keys two runs differ in, and their metrics (job names are looked "
        "up in SWEEP_DIR when it is given)",
    )
    args = parser.parse_args(argv)
    configure_cli_logging()
    if args.diff:
        if args.wandb or args.metric or args.maximize:
            parser.error(
                "--wandb, --metric and --maximize rank a sweep; --diff compares two runs. Fix: drop them"
            )
        with exit_on_error():
            print_diff(diff_runs(*(run_path(name, args.sweep_dir) for name in args.diff)))
        return
    if args.sweep_dir is None:
        parser.error("pass SWEEP_DIR (the hydra.sweep.dir of a sweep), or --diff RUN_A RUN_B")
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory. Fix: pass the hydra.sweep.dir of a sweep")
    if not find_job_dirs(args.sweep_dir):
        parser.error(
            f"no job directories under {args.sweep_dir} (a job directory holds .hydra/overrides.yaml). "
            "Fix: pass the sweep directory (hydra.sweep.dir), not a single run"
        )
    try:
        comparison = build_comparison(args.sweep_dir, args.metric or DEFAULT_METRIC, args.maximize)
    except ValueError as exc:
        parser.error(str(exc))
    with exit_on_error():
        write_comparison(comparison)
        print_comparison(comparison)
        if args.wandb:
            log_comparison_run(comparison)


if __name__ == "__main__":
    main()
