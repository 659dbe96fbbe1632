"""Jobs read back from their run directories, the keys a sweep varied, and two runs' differences."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from qlora_exp.errors import RunDirectoryError
from qlora_exp.run.directory import HISTORY_FILE, METRICS, RESOLVED_CONFIG, config_diff
from qlora_exp.run.sweep import job_state


@dataclass
class Job:
    """What a job (or run) directory holds that a comparison needs."""

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


def shared_overrides(jobs: list[Job]) -> list[str]:
    """`key=value` of every override all jobs share (what the sweep held constant)."""
    swept = set(swept_keys(jobs))
    keys = dict.fromkeys(k for job in jobs for k in job.overrides)
    return [f"{k}={jobs[0].overrides[k]}" for k in keys if k not in swept]


def param_value(job: Job, key: str) -> Any:
    """The typed value of a swept key from the resolved config (e.g. 2e-4 as a float), else the
    override's text (a config group choice such as `model=tiny`)."""
    node: Any = job.config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return job.overrides.get(key)
        node = node[part]
    return node if not isinstance(node, (dict, list)) else job.overrides.get(key)


@dataclass(frozen=True)
class RunDiff:
    """Two runs side by side: the resolved-config keys that differ and their metrics."""

    first: Job
    second: Job
    config: pd.DataFrame  # key, A, B: one row per differing key
    metrics: pd.DataFrame  # metric, A, B, B - A


def load_run(path: Path) -> Job:
    """A run or sweep job directory that qlora-train wrote (it has a resolved config)."""
    if not path.is_dir():
        raise RunDirectoryError(f"run directory not found: {path}. Fix: pass a qlora-train run directory")
    if not (path / RESOLVED_CONFIG).is_file():
        raise RunDirectoryError(
            f"{path} has no {RESOLVED_CONFIG}: not a qlora-train run. Fix: pass a run or sweep job directory"
        )
    return load_job(path)


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def diff_runs(first_dir: Path, second_dir: Path) -> RunDiff:
    """The resolved-config keys that differ (`config_diff`, the comparison resume and sweep
    reruns use) and the scalar metrics of both runs with their difference."""
    first, second = load_run(first_dir), load_run(second_dir)
    rows = [
        {"key": key, "A": str(old), "B": str(new)}
        for key, (old, new) in config_diff(first.config, second.config).items()
    ]
    config = pd.DataFrame(rows, columns=["key", "A", "B"])
    names = dict.fromkeys([*first.metrics, *second.metrics])
    metric_rows = []
    for name in names:
        a: Any = first.metrics.get(name)
        b: Any = second.metrics.get(name)
        if not (_scalar(a) and _scalar(b)):
            continue  # e.g. eval_history: the loss curves show it
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
        metric_rows.append({"metric": name, "A": a, "B": b, "B - A": b - a if numbers else None})
    metrics = pd.DataFrame(metric_rows, columns=["metric", "A", "B", "B - A"])
    return RunDiff(first, second, config, metrics)
