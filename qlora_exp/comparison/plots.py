"""The comparison's plots: every job's loss curves, and a metric over two swept parameters."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # the object API draws to files without pyplot's global backend
from matplotlib.ticker import MaxNLocator

from qlora_exp.comparison.jobs import Job, param_value


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


def plot_heatmap(table: pd.DataFrame, x: str, y: str, column: str, path: Path, *, note: str = "") -> None:
    """The table's `column` over two swept parameters (mean where several jobs share a cell)."""
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
