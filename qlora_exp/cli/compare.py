"""qlora-compare SWEEP_DIR: compare the jobs of a sweep offline, from their run directories.

Writes comparison.csv and comparison.md (one row per job, best first) and PNG plots (loss curves
of every job; a heatmap of the metric over two swept parameters) into the sweep directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from matplotlib.figure import Figure  # the object API draws to files without pyplot's global backend
from matplotlib.ticker import MaxNLocator

from qlora_exp.run.directory import COMPLETED, HISTORY_FILE, METRICS, RESOLVED_CONFIG
from qlora_exp.run.sweep import find_job_dirs, job_state

log = logging.getLogger("qlora_exp.cli.compare")

# metrics.json key -> table column
METRIC_COLUMNS = {
    "eval_loss": "eval_loss",
    "perplexity": "perplexity",
    "train_tokens_per_second": "tokens_per_s",
    "peak_memory_gb": "peak_memory_gb",
    "train_runtime_s": "runtime_s",
}
SEED = "seed"
TOKEN_SPREAD_TOLERANCE = 0.10  # seeds sample different rows, so token counts differ a little


@dataclass
class Job:
    """What a job directory holds that a comparison needs."""

    path: Path
    status: str
    reason: str
    overrides: dict[str, str]
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def _read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """Hydra override strings (`lora.r=16`, `+x=1`, `model=tiny`) as key -> value text."""
    parsed = OverridesParser.create().parse_overrides(lines)
    return {o.key_or_group: o.get_value_element_as_str() for o in parsed}


def load_job(path: Path) -> Job:
    """Read one job directory; files a failed or unfinished job lacks are left empty."""
    state = job_state(path)
    return Job(
        path=path,
        status=state.status,
        reason=state.reason,
        overrides=parse_overrides(_read_yaml(path / ".hydra" / "overrides.yaml") or []),
        config=_read_yaml(path / RESOLVED_CONFIG) or {},
        metrics=_read_json(path / METRICS) or {},
        history=_read_json(path / HISTORY_FILE) or [],
    )


def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value is not the same in every job, in command-line order."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def param_value(job: Job, key: str) -> Any:
    """The typed value of a swept key from the resolved config (e.g. 2e-4 as a float), else the
    override's text (a config group choice such as `model=tiny`)."""
    node: Any = job.config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return job.overrides.get(key)
        node = node[part]
    return node if not isinstance(node, (dict, list)) else job.overrides.get(key)


def comparison_table(jobs: list[Job], metric: str, maximize: bool = False) -> pd.DataFrame:
    """One row per job: swept values, status, metrics; best first, jobs without the metric last."""
    keys = swept_keys(jobs)
    rows = []
    for job in jobs:
        row: dict[str, Any] = {"job": job.path.name}
        row.update({key: param_value(job, key) for key in keys})
        row["status"] = job.status
        row.update({column: job.metrics.get(name, math.nan) for name, column in METRIC_COLUMNS.items()})
        if metric not in METRIC_COLUMNS:
            row[metric] = job.metrics.get(metric, math.nan)
        row["note"] = job.reason.splitlines()[0][:80] if job.reason else ""
        rows.append(row)
    table = pd.DataFrame(rows)
    column = METRIC_COLUMNS.get(metric, metric)
    table[column] = pd.to_numeric(table[column], errors="coerce")
    return table.sort_values(column, ascending=not maximize, na_position="last", kind="stable").reset_index(
        drop=True
    )


def seed_summary(table: pd.DataFrame, keys: list[str], metric: str) -> pd.DataFrame | None:
    """Mean, std and count of the metric over seeds for each setting of the other swept keys;
    None when `seed` is not swept."""
    if SEED not in keys:
        return None
    column = METRIC_COLUMNS.get(metric, metric)
    others = [k for k in keys if k != SEED]
    done = table[table["status"] == COMPLETED]
    if not others:
        stats = done[column].agg(["mean", "std", "count"]).to_frame().T
    else:
        stats = done.groupby(others, dropna=False)[column].agg(["mean", "std", "count"]).reset_index()
    return stats.rename(columns={"mean": f"{column}_mean", "std": f"{column}_std", "count": "seeds"})


def fairness_warnings(jobs: list[Job]) -> list[str]:
    """Differences that make jobs incomparable: effective batch size, examples seen, tokens seen."""
    done = [job for job in jobs if job.status == COMPLETED and job.config and job.metrics]
    if len(done) < 2:
        return []
    warnings = []

    def effective_batch(job: Job) -> int:
        if "effective_batch_size" in job.metrics:  # as the run measured it, every data-parallel rank counted
            return int(job.metrics["effective_batch_size"])
        trainer = job.config["trainer"]  # a run that recorded none ran as one process
        return int(trainer["per_device_train_batch_size"]) * int(trainer["gradient_accumulation_steps"])

    batches = {job.path.name: effective_batch(job) for job in done}
    if len(set(batches.values())) > 1:
        warnings.append(f"effective batch sizes differ across jobs: {_describe(batches)}")
    examples = {job.path.name: effective_batch(job) * int(job.metrics["train_steps"]) for job in done}
    if len(set(examples.values())) > 1:
        warnings.append(f"training examples seen (steps x effective batch) differ: {_describe(examples)}")
    tokens = {job.path.name: int(job.metrics["train_tokens"]) for job in done}
    low, high = min(tokens.values()), max(tokens.values())
    if low == 0 or (high - low) / low > TOKEN_SPREAD_TOLERANCE:
        warnings.append(
            f"training tokens differ by more than {TOKEN_SPREAD_TOLERANCE:.0%}: {_describe(tokens)}"
        )
    return warnings


def _describe(values: dict[str, int]) -> str:
    return ", ".join(f"{name}: {value}" for name, value in values.items())


def _label(job: Job, keys: list[str]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={param_value(job, k)}" for k in keys) or job.path.name


def plot_loss_curves(jobs: list[Job], keys: list[str], path: Path) -> None:
    """Train loss per step and eval loss (before training, then as logged) of every job."""
    fig = Figure(figsize=(13, 5))
    train_ax, eval_ax = fig.subplots(1, 2)
    colors = matplotlib.colormaps["viridis"].resampled(max(len(jobs), 2))
    for index, job in enumerate(jobs):
        label, color = _label(job, keys), colors(index)
        train = [(e["step"], e["loss"]) for e in job.history if "loss" in e]
        evals = [(e["step"], e["eval_loss"]) for e in job.history if "eval_loss" in e]
        if "eval_loss_before" in job.metrics and not any(step == 0 for step, _ in evals):
            # runs that evaluated before train() (not eval_on_start) lost that entry from the history
            evals.insert(0, (0, job.metrics["eval_loss_before"]))
        if train:
            train_ax.plot(*zip(*train, strict=True), color=color, label=label)
        if evals:
            eval_ax.plot(*zip(*evals, strict=True), marker="o", color=color, label=label)
    for ax, title in ((train_ax, "train loss"), (eval_ax, "eval loss (step 0: before training)")):
        ax.set(title=title, xlabel="optimizer step", ylabel="loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, labels = eval_ax.get_legend_handles_labels()  # every job with metrics has eval points
    fig.legend(handles, labels, loc="center right", fontsize="small", title="job")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=110)


def _tick(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def plot_heatmap(table: pd.DataFrame, x: str, y: str, metric: str, path: Path, *, note: str = "") -> None:
    """The metric over two swept parameters (mean where several jobs share a cell)."""
    column = METRIC_COLUMNS.get(metric, metric)
    grid = table.pivot_table(index=y, columns=x, values=column, aggfunc="mean", dropna=False)
    values = grid.to_numpy(dtype=float)
    fig = Figure(figsize=(1.6 * len(grid.columns) + 3, 1.0 * len(grid.index) + 2.5))
    ax = fig.subplots()
    image = ax.imshow(values, cmap="viridis_r" if "loss" in column else "viridis")
    ax.set_xticks(range(len(grid.columns)), [_tick(v) for v in grid.columns])
    ax.set_yticks(range(len(grid.index)), [_tick(v) for v in grid.index])
    better = "lower" if "loss" in column or "perplexity" in column else "higher"
    ax.set(xlabel=x, ylabel=y, title=f"{column}{note}, {better} is better")
    for (row, col), value in np.ndenumerate(values):
        if math.isnan(value):
            ax.text(col, row, "n/a", ha="center", va="center", fontsize="small")  # failed or missing
            continue
        red, green, blue, _ = image.cmap(image.norm(value))
        dark_cell = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
        ax.text(col, row, f"{value:.4g}", ha="center", va="center", color="white" if dark_cell else "black")
    fig.colorbar(image, ax=ax, label=column)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_markdown(
    path: Path, table: pd.DataFrame, seeds: pd.DataFrame | None, best: str, warnings: list[str]
) -> None:
    """comparison.md: the best run, warnings, the per-job table and the mean ± std table."""
    parts = [f"# Sweep comparison: {path.parent.name}", "", best, ""]
    parts += [f"> **Warning:** {w}" for w in warnings] + ([""] if warnings else [])
    parts += [table.to_markdown(index=False, floatfmt=".4g"), ""]
    if seeds is not None:
        parts += ["## Mean ± std over seeds", "", seeds.to_markdown(index=False, floatfmt=".4g"), ""]
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def compare(sweep_dir: Path, metric: str = "eval_loss", maximize: bool = False) -> pd.DataFrame:
    """Build the table, print it, and write the CSV, Markdown and plots into `sweep_dir`."""
    jobs = [load_job(path) for path in find_job_dirs(sweep_dir)]
    known = {key for job in jobs for key in job.metrics}
    if known and metric not in known:
        raise ValueError(f"--metric {metric}: no job has it. Fix: use one of {', '.join(sorted(known))}")
    keys = swept_keys(jobs)
    table = comparison_table(jobs, metric, maximize)
    column = METRIC_COLUMNS.get(metric, metric)
    ranked = table[(table["status"] == COMPLETED) & table[column].notna()]
    best = (
        f"Best run: {ranked.iloc[0]['job']} ({column}={ranked.iloc[0][column]:.4g})"
        if len(ranked)
        else f"Best run: none (no COMPLETED job has {column})"
    )
    seeds = seed_summary(table, keys, metric)
    if seeds is not None and len(keys) > 1:
        order = seeds.sort_values(f"{column}_mean", ascending=not maximize, na_position="last")
        best += f"; best setting over seeds: {order.iloc[0][[k for k in keys if k != SEED]].to_dict()}"
    warnings = fairness_warnings(jobs)
    for warning in warnings:
        log.warning("unfair comparison: %s", warning)

    table.to_csv(sweep_dir / "comparison.csv", index=False)
    write_markdown(sweep_dir / "comparison.md", table, seeds, best, warnings)
    plot_loss_curves(jobs, keys, sweep_dir / "loss_curves.png")
    params = [k for k in keys if k != SEED]
    if len(params) >= 2:
        note = " (mean over seeds)" if SEED in keys else ""
        if len(params) > 2:
            note += f" (mean over {', '.join(params[2:])})"
        plot_heatmap(table, params[1], params[0], metric, sweep_dir / f"heatmap_{column}.png", note=note)
    else:
        log.info("no heatmap: it needs two swept parameters besides seed, found %s", params or "none")

    with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_colwidth", 60):
        print(table.drop(columns=["note"]).to_string(index=False))  # the CLI's output is the table
        if seeds is not None:
            print("\nmean ± std over seeds:\n" + seeds.to_string(index=False))
    print(best)
    log.info("wrote comparison.csv, comparison.md and plots to %s", sweep_dir)
    return table


def main(argv: list[str] | None = None) -> None:
    """Console entry point of `qlora-compare`."""
    parser = argparse.ArgumentParser(prog="qlora-compare", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="hydra.sweep.dir of a `qlora-train -m` run")
    parser.add_argument("--metric", default="eval_loss", help="metrics.json key to rank by (eval_loss)")
    parser.add_argument("--maximize", action="store_true", help="higher is better (e.g. tokens/s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory. Fix: pass the hydra.sweep.dir of a sweep")
    if not find_job_dirs(args.sweep_dir):
        parser.error(
            f"no job directories under {args.sweep_dir} (a job directory holds .hydra/overrides.yaml). "
            "Fix: pass the sweep directory (hydra.sweep.dir), not a single run"
        )
    try:
        compare(args.sweep_dir, args.metric, args.maximize)
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
