"""Experiment tracking: a Weights & Biases run per job (files inside the run directory; in a
sweep, grouped by the sweep), and the Trainer's log history in the run directory.

We log through our own small callback instead of transformers' WandbCallback: that one merges
every TrainingArguments field into the W&B config, so the run's config would no longer be the
resolved experiment config (and would carry fields such as hub tokens).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import wandb
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from qlora_exp.run.context import RunContext
from qlora_exp.run.directory import HISTORY_FILE, WANDB_RUN_ID_FILE, redact_secrets, write_json_atomic
from qlora_exp.run.distributed import is_main_process
from qlora_exp.schema import TrackingConfig
from qlora_exp.training import perplexity

log = logging.getLogger(__name__)


class Tracker:
    """A W&B run (or nothing, for tracking=none) with log/summary/finish."""

    def __init__(self, cfg: TrackingConfig, run: RunContext, config: dict[str, Any]) -> None:
        run_dir = run.path
        self.run_dir = run_dir
        self.run: Any = None
        if not is_main_process():
            return
        if cfg.backend == "none" or cfg.mode == "disabled":
            log.info("tracking off (tracking.backend=%s, tracking.mode=%s)", cfg.backend, cfg.mode)
            return
        id_file = run_dir / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        group, name = run.tracking_group_and_name()
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group or group,
            name=cfg.name or name,
            job_type=cfg.job_type,
            tags=list(cfg.tags),
            config=redact_secrets(config),
            dir=str(run_dir),
            mode=cfg.mode,  # type: ignore[arg-type]  # validated by the schema
            id=run_id,
            resume="allow",
        )
        id_file.write_text(run_id + "\n", encoding="utf-8")
        log.info("W&B run %s (%s mode) in %s", run_id, cfg.mode, run_dir / "wandb")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self.finish(failed=exc is not None)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log scalar metrics at `step`."""
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_table(self, key: str, rows: list[dict[str, Any]], step: int | None = None) -> None:
        """Log rows (dicts with the same keys) as a W&B table under `key`."""
        if self.run is not None and rows:
            names = list(rows[0])
            columns: list[str | int] = [*names]
            table = wandb.Table(columns=columns, data=[[row[n] for n in names] for row in rows])
            self.run.log({key: table}, step=step)

    def summarize(self, metrics: dict[str, Any]) -> None:
        """Put final metrics in the run summary."""
        if self.run is not None:
            self.run.summary.update(metrics)

    def finish(self, failed: bool) -> None:
        """Close the run; a failed job is marked with a non-zero exit code in W&B."""
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None


class TrackingCallback(TrainerCallback):
    """Forwards the Trainer's logs (loss, lr, grad norm, eval) to the tracker, and rewrites the
    run directory's log_history.json from the Trainer's state, for plots without W&B
    (`qlora-compare`): transformers writes it only inside checkpoints. A resumed run restores
    the state's history, so the file stays whole."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs and state.is_world_process_zero:
            extra = {"eval_perplexity": perplexity(logs["eval_loss"])} if "eval_loss" in logs else {}
            self.tracker.log({**logs, **extra}, step=state.global_step)
            write_json_atomic(self.tracker.run_dir / HISTORY_FILE, state.log_history)
