"""`qlora-compare --wandb`: the sweep itself as one more W&B run (job_type `comparison`) in the
jobs' project and group, with its files inside the sweep directory, so W&B shows the comparison
table, the plots and the best run next to the jobs' runs. Rerunning it continues the same run."""

from __future__ import annotations

import logging
from typing import Any

import wandb

from qlora_exp.comparison.jobs import Job, shared_overrides
from qlora_exp.comparison.table import METRIC_COLUMNS, Comparison
from qlora_exp.errors import ConfigError
from qlora_exp.run.context import override_tags, sweep_group
from qlora_exp.run.directory import COMPLETED
from qlora_exp.schema import TrackingConfig
from qlora_exp.tracking import open_wandb_run

log = logging.getLogger(__name__)

COMPARISON_JOB_TYPE = "comparison"
COMPARISON_RUN_NAME = "comparison"
SHARED_TRACKING_KEYS = ("project", "entity", "group")


def sweep_tracking(comparison: Comparison) -> TrackingConfig:
    """Where the jobs logged (project, entity, group, mode, shared tags), for the comparison run to
    join them. Jobs that were not tracked give the defaults, offline."""
    sections = [job.config["tracking"] for job in comparison.jobs if job.config.get("tracking")]
    shared: dict[str, Any] = {}
    for key in SHARED_TRACKING_KEYS:
        values = {section.get(key) for section in sections}
        if len(values) > 1:
            raise ConfigError(
                f"the jobs of {comparison.sweep_dir} log to different W&B tracking.{key} values "
                f"({', '.join(sorted(map(str, values)))}): one comparison run cannot join them all. "
                "Fix: compare a sweep whose jobs share one W&B project and group"
            )
        if values:
            shared[key] = values.pop()
    tracked = [s for s in sections if s.get("backend") == "wandb" and s.get("mode") != "disabled"]
    modes = {s["mode"] for s in tracked}
    mode = modes.pop() if len(modes) == 1 else "offline"
    if not tracked:
        log.info("the jobs were not tracked by W&B; the comparison run is %s", mode)
    elif len(modes) > 1:
        log.info("the jobs ran in W&B modes %s; the comparison run is offline", sorted(modes))
    tag_lists = [list(section.get("tags") or []) for section in sections]
    tags = [tag for tag in tag_lists[0] if all(tag in other for other in tag_lists)] if tag_lists else []
    return TrackingConfig(mode=mode, tags=tags, **{k: v for k, v in shared.items() if v is not None})


def log_comparison_run(comparison: Comparison) -> str:
    """Log the comparison (written by `write_comparison` first: its plots are logged) as the sweep's
    W&B run; returns the run id, kept in the sweep directory so a rerun updates the same run."""
    tracking = sweep_tracking(comparison)
    sweep_dir, best = comparison.sweep_dir, comparison.best_job
    shared = shared_overrides(comparison.jobs)
    config = {
        "sweep": {"dir": str(sweep_dir.resolve()), "swept_keys": comparison.keys, "shared_overrides": shared},
        "metric": comparison.metric,
        "maximize": comparison.maximize,
        "best_run": best.path.name if best else None,
        "best_config": best.config if best else None,
    }
    with open_wandb_run(
        tracking,
        sweep_dir,
        group=tracking.group or sweep_group(sweep_dir),
        name=COMPARISON_RUN_NAME,
        job_type=COMPARISON_JOB_TYPE,
        tags=[*tracking.tags, *override_tags(shared)],
        config=config,
    ) as run:
        media: dict[str, Any] = {"comparison": wandb.Table(dataframe=comparison.table)}
        if comparison.seeds is not None:
            media["seed_summary"] = wandb.Table(dataframe=comparison.seeds)
        media.update({name: wandb.Image(str(path)) for name, path in comparison.plots.items()})
        run.log(media)
        run.summary.update(_summary(comparison, best))
        run_id: str = run.id
    log.info("W&B comparison run %s (%s) in %s", run_id, tracking.mode, sweep_dir / "wandb")
    return run_id


def _summary(comparison: Comparison, best: Job | None) -> dict[str, Any]:
    completed = sum(job.status == COMPLETED for job in comparison.jobs)
    summary: dict[str, Any] = {
        "jobs": len(comparison.jobs),
        "completed": completed,
        "best_run": best.path.name if best else None,
        "warnings": comparison.warnings,
    }
    if best is not None:
        summary[f"best_{comparison.column}"] = best.metrics[comparison.metric]
        summary.update(
            {
                f"best/{col}": best.metrics[name]
                for name, col in METRIC_COLUMNS.items()
                if name in best.metrics
            }
        )
    return summary
