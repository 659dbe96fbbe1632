"""A sweep's comparison: one row per job (best first), mean ± std over seeds, fairness warnings,
and the files it writes into the sweep directory (CSV, Markdown, plots)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from qlora_exp.comparison.jobs import Job, load_job, param_value, swept_keys
from qlora_exp.comparison.plots import plot_heatmap, plot_loss_curves
from qlora_exp.run.directory import COMPLETED
from qlora_exp.run.sweep import find_job_dirs

log = logging.getLogger(__name__)

# metrics.json key -> table column
METRIC_COLUMNS = {
    "eval_loss": "eval_loss",
    "perplexity": "perplexity",
    "train_tokens_per_second": "tokens_per_s",
    "peak_memory_gb": "peak_memory_gb",
    "train_runtime_s": "runtime_s",
}
# Preference runs' figures (method=dpo, docs/preference.md): columns only in a table that has such a run
PREFERENCE_COLUMNS = {"reward_accuracy": "reward_accuracy", "reward_margin": "reward_margin"}
SEED = "seed"
TOKEN_SPREAD_TOLERANCE = 0.10  # seeds sample different rows, so token counts differ a little
# What qlora-compare writes into the sweep directory (besides heatmap_<column>.png)
COMPARISON_CSV = "comparison.csv"
COMPARISON_MD = "comparison.md"
LOSS_CURVES = "loss_curves.png"


def metric_column(metric: str) -> str:
    """The table column of a metrics.json key (itself for keys without a short name)."""
    return METRIC_COLUMNS.get(metric, metric)


def comparison_table(jobs: list[Job], metric: str, maximize: bool = False) -> pd.DataFrame:
    """One row per job: swept values, status, metrics; best first, jobs without the metric last."""
    keys = swept_keys(jobs)
    preference = any(name in job.metrics for job in jobs for name in PREFERENCE_COLUMNS)
    columns = {**METRIC_COLUMNS, **(PREFERENCE_COLUMNS if preference else {})}
    rows = []
    for job in jobs:
        row: dict[str, Any] = {"job": job.path.name}
        row.update({key: param_value(job, key) for key in keys})
        row["status"] = job.status
        row.update({column: job.metrics.get(name, math.nan) for name, column in columns.items()})
        if metric not in columns:
            row[metric] = job.metrics.get(metric, math.nan)
        row["note"] = job.reason.splitlines()[0][:80] if job.reason else ""
        rows.append(row)
    table = pd.DataFrame(rows)
    column = metric_column(metric)
    table[column] = pd.to_numeric(table[column], errors="coerce")
    return table.sort_values(column, ascending=not maximize, na_position="last", kind="stable").reset_index(
        drop=True
    )


def seed_summary(table: pd.DataFrame, keys: list[str], metric: str) -> pd.DataFrame | None:
    """Mean, std and count of the metric over seeds for each setting of the other swept keys;
    None when `seed` is not swept."""
    if SEED not in keys:
        return None
    column = metric_column(metric)
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


@dataclass
class Comparison:
    """A sweep's jobs compared on one metric; `write_comparison` fills `plots`."""

    sweep_dir: Path
    metric: str
    maximize: bool
    jobs: list[Job]
    keys: list[str]  # the swept override keys
    table: pd.DataFrame
    seeds: pd.DataFrame | None
    best_job: Job | None  # the best COMPLETED job with the metric
    best: str  # the "Best run: ..." sentence
    warnings: list[str]
    plots: dict[str, Path] = field(default_factory=dict)  # name (file stem) -> PNG

    @property
    def column(self) -> str:
        """The table column of the metric ranked by."""
        return metric_column(self.metric)


def build_comparison(sweep_dir: Path, metric: str = "eval_loss", maximize: bool = False) -> Comparison:
    """Read every job of `sweep_dir` and rank them by `metric` (nothing is written)."""
    jobs = [load_job(path) for path in find_job_dirs(sweep_dir)]
    known = {key for job in jobs for key in job.metrics}
    if known and metric not in known:
        raise ValueError(f"--metric {metric}: no job has it. Fix: use one of {', '.join(sorted(known))}")
    keys = swept_keys(jobs)
    table = comparison_table(jobs, metric, maximize)
    column = metric_column(metric)
    ranked = table[(table["status"] == COMPLETED) & table[column].notna()]
    best_job = None
    if len(ranked):
        best_job = next(job for job in jobs if job.path.name == ranked.iloc[0]["job"])
        best = f"Best run: {best_job.path.name} ({column}={ranked.iloc[0][column]:.4g})"
    else:
        best = f"Best run: none (no COMPLETED job has {column})"
    seeds = seed_summary(table, keys, metric)
    if seeds is not None and len(keys) > 1:
        order = seeds.sort_values(f"{column}_mean", ascending=not maximize, na_position="last")
        best += f"; best setting over seeds: {order.iloc[0][[k for k in keys if k != SEED]].to_dict()}"
    warnings = fairness_warnings(jobs)
    for warning in warnings:
        log.warning("unfair comparison: %s", warning)
    return Comparison(sweep_dir, metric, maximize, jobs, keys, table, seeds, best_job, best, warnings)


def write_markdown(comparison: Comparison, path: Path) -> None:
    """comparison.md: the best run, warnings, the per-job table and the mean ± std table."""
    parts = [f"# Sweep comparison: {comparison.sweep_dir.resolve().name}", "", comparison.best, ""]
    parts += [f"> **Warning:** {w}" for w in comparison.warnings] + ([""] if comparison.warnings else [])
    parts += [comparison.table.to_markdown(index=False, floatfmt=".4g"), ""]
    if comparison.seeds is not None:
        parts += [
            "## Mean ± std over seeds",
            "",
            comparison.seeds.to_markdown(index=False, floatfmt=".4g"),
            "",
        ]
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def write_comparison(comparison: Comparison) -> None:
    """comparison.csv, comparison.md, loss_curves.png and (with two swept parameters besides seed)
    heatmap_<metric>.png into the sweep directory."""
    sweep_dir, keys, column = comparison.sweep_dir, comparison.keys, comparison.column
    comparison.table.to_csv(sweep_dir / COMPARISON_CSV, index=False)
    write_markdown(comparison, sweep_dir / COMPARISON_MD)
    comparison.plots[Path(LOSS_CURVES).stem] = sweep_dir / LOSS_CURVES
    plot_loss_curves(comparison.jobs, keys, sweep_dir / LOSS_CURVES)
    params = [k for k in keys if k != SEED]
    if len(params) >= 2:
        note = " (mean over seeds)" if SEED in keys else ""
        if len(params) > 2:
            note += f" (mean over {', '.join(params[2:])})"
        heatmap = sweep_dir / f"heatmap_{column}.png"
        plot_heatmap(comparison.table, params[1], params[0], column, heatmap, note=note)
        comparison.plots[heatmap.stem] = heatmap
    else:
        log.info("no heatmap: it needs two swept parameters besides seed, found %s", params or "none")
    log.info("wrote %s, %s and plots to %s", COMPARISON_CSV, COMPARISON_MD, sweep_dir)
