"""Sweep mechanics on top of Hydra's multirun: job directories named by what varies, stable across
reruns; skipping finished jobs; containing one job's failure; the end-of-sweep summary.

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
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.utils import configure_log
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from qlora_exp.errors import ConfigError, ExitCode, exit_on_error
from qlora_exp.run.context import RunContext
from qlora_exp.run.directory import (
    COMPLETED,
    FAILED,
    METRICS,
    REDACTED,
    RESOLVED_CONFIG,
    SECRET_KEY,
    RunDirectory,
    config_diff,
    redact_arg,
    redact_secrets,
)

log = logging.getLogger(__name__)

JOB_DIRNAME_RESOLVER = "job_dirname"
MAX_DIRNAME = 150  # well under the 255-byte limit of one path component
INCOMPLETE = "INCOMPLETE"
MULTIRUN_FILE = "multirun.yaml"  # Hydra's record of a sweep's config, rewritten by every invocation


def job_dirname(override_dirname: str, num: int) -> str:
    """A job's sweep subdirectory, named by its overrides of the keys that vary within the sweep
    (`JobNames` leaves the constant ones out of `hydra.job.override_dirname`), so that a rerun of the
    same sweep command maps each job to the same directory (Optuna restarts `hydra.job.num` at 0 on
    every invocation, so the job number is not stable there)."""
    name = override_dirname.replace("/", "%2F") or f"job_{num}"
    if len(name) > MAX_DIRNAME:
        digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:10]
        name = f"{name[: MAX_DIRNAME - 11]}-{digest}"
    return name


def register_sweep_configs() -> None:
    """The `job_dirname` resolver that conf/config.yaml names job directories with."""
    OmegaConf.register_new_resolver(JOB_DIRNAME_RESOLVER, job_dirname, replace=True)


def parse_overrides(lines: list[str]) -> list[Override]:
    """Hydra's parse of override lines, a secret's value replaced first: Hydra's saved files hold it
    as <redacted> (`RedactSecrets`), which the override grammar refuses unquoted."""
    quoted = []
    for line in lines:
        key, sep, _ = line.partition("=")
        quoted.append(f"{key}='{REDACTED}'" if sep and SECRET_KEY.search(key) else line)
    return OverridesParser.create().parse_overrides(quoted)


def sweep_overrides(config: DictConfig) -> dict[str, Override]:
    """The overrides a sweep is built from, by key, as Hydra's basic and Optuna sweepers read them:
    `hydra.sweeper.params`, then the command line's task overrides (a later one for the same key
    replaces an earlier one)."""
    params = config.hydra.sweeper.get("params") or {}
    lines = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    return {o.get_key_element(): o for o in parse_overrides(lines)}


def constant_overrides(config: DictConfig) -> dict[str, str]:
    """{key: "key=value"} for every override of a sweep that is not a sweep (choice, range,
    interval, glob): every job gets it. Values are normalised (`1e-3` and `0.001` are equal), as
    the basic sweeper writes them into each job's overrides; secret values are redacted."""
    return {
        o.key_or_group: redact_arg(f"{key}={o.get_value_element_as_str()}")
        for key, o in sweep_overrides(config).items()
        if not o.is_sweep_override()
    }


def split_job_overrides(overrides: list[str], constant_keys: set[str]) -> tuple[list[str], list[str]]:
    """A job's overrides as (those of keys that vary within its sweep, those every job shares),
    each sorted as Hydra sorts `override_dirname`; secret values are redacted."""
    parsed = parse_overrides(overrides)
    shared = sorted(redact_arg(o.input_line or "") for o in parsed if o.key_or_group in constant_keys)
    varying = sorted(redact_arg(o.input_line or "") for o in parsed if o.key_or_group not in constant_keys)
    return varying, shared


class JobNames(Callback):
    """Hydra callback (conf/config.yaml `hydra.callbacks`): names each job of a sweep by the keys that
    vary, and refuses to mix two different sweeps in one sweep directory.

    Hydra names a job by all its overrides (`hydra.job.override_dirname`), so a constant override such
    as `data.path=/data/x.json` would be repeated in every job's directory and W&B run name. Before the
    sweeper starts, this adds the sweep's constant keys to Hydra's own
    `hydra.job.config.override_dirname.exclude_keys` (through `hydra.overrides.hydra`, which every
    launcher applies when it composes each job's config, in this process or a remote one), so
    `lora.r=4,8` names its jobs `lora.r=4` and `lora.r=8`. Keys that vary are known before any job
    runs for every sweeper: they are the sweeps among the sweeper's params and the command line.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns an exception raised by a callback into a warning and runs the sweep anyway (with
        # every override in the job names, or mixed with an earlier sweep): end the process instead.
        with exit_on_error():
            self._name_jobs(config)

    def _name_jobs(self, config: DictConfig) -> None:
        constant = constant_overrides(config)
        refuse_other_constants(Path(config.hydra.sweep.dir), constant)
        exclude = sorted({*config.hydra.job.config.override_dirname.exclude_keys, *constant})
        listed = ",".join(f"'{key}'" for key in exclude)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.overrides.hydra.append(f"hydra.job.config.override_dirname.exclude_keys=[{listed}]")
            config.hydra.job.config.override_dirname.exclude_keys = exclude  # as multirun.yaml shows it
        if constant:
            log.info("sweep jobs are named by the keys that vary; shared: %s", " ".join(constant.values()))


def refuse_other_constants(sweep_dir: Path, constant: dict[str, str]) -> None:
    """Refuse a sweep whose constant overrides differ from those of the earlier invocation that
    wrote `sweep_dir/multirun.yaml`: its jobs would get the same names as the earlier jobs (names
    leave constant overrides out) and be mixed with or replace them."""
    previous_file = sweep_dir / MULTIRUN_FILE
    if not previous_file.is_file():
        return
    previous = constant_overrides(OmegaConf.load(previous_file))  # type: ignore[arg-type]
    differences = config_diff(previous, constant)
    if differences:
        changes = "; ".join(f"{key}: {old} -> {new}" for key, (old, new) in differences.items())
        raise ConfigError(
            f"hydra.sweep.dir={sweep_dir} holds a sweep run with other constant overrides ({changes}); "
            "jobs are named by the keys that vary only, so its jobs and these would share directories. "
            "Fix: rerun with that sweep's constant overrides (its multirun.yaml lists them; finished jobs "
            "are skipped), or pass a new hydra.sweep.dir"
        )


def finished_objective(run: RunContext, resolved: dict[str, Any]) -> float | None:
    """In a sweep, the eval_loss of this job's earlier COMPLETED run with the same resolved
    config (the job is then skipped, before any data or model loads); None when it must run.
    A COMPLETED job whose config differs (an edited preset, another code version) is refused: its
    results stay as they are."""
    run_dir = run.path
    if not run.in_sweep or not (run_dir / COMPLETED).is_file():
        return None
    stored = yaml.safe_load((run_dir / RESOLVED_CONFIG).read_text(encoding="utf-8"))
    differences = list(config_diff(stored, redact_secrets(resolved)))
    if differences:
        raise ConfigError(
            f"{run_dir} holds a COMPLETED job with another resolved config (differs at "
            f"{', '.join(differences)}); it is kept as it is. Fix: rerun into a new hydra.sweep.dir, "
            "or restore the settings it ran with"
        )
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
    # Failed before claiming its directory, e.g. a bad override; a COMPLETED job refused by
    # `finished_objective` keeps its marker.
    if not (run.path / FAILED).is_file() and not (run.path / COMPLETED).is_file():
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
