"""Experiment tracking: a Weights & Biases run per job (files inside the run directory; in a
sweep, grouped by the sweep and named by what varies), its adapter as a W&B model artifact, and the
Trainer's log history in the run directory.

We log through our own small callback instead of transformers' WandbCallback: that one merges
every TrainingArguments field into the W&B config, so the run's config would no longer be the
resolved experiment config (and would carry fields such as hub tokens); its model artifact
(WANDB_LOG_MODEL) holds the Trainer's output directory, checkpoints included.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from qlora_exp.run.context import RunContext
from qlora_exp.run.directory import (
    ADAPTER_DIR,
    HISTORY_FILE,
    PROVENANCE,
    TOKENIZER_DIR,
    WANDB_RUN_ID_FILE,
    redact_secrets,
    write_json_atomic,
)
from qlora_exp.run.distributed import is_main_process
from qlora_exp.schema import Config, TrackingConfig, to_plain_dict
from qlora_exp.training import perplexity

log = logging.getLogger(__name__)
# W&B is imported where it is used (open_wandb_run, log_table, log_adapter), not at the top: its
# import (~1 s) would otherwise be paid by every process that trains with tracking=none (smoke runs,
# tests, sweep jobs without W&B).

ARTIFACT_TYPE = "model"
# metrics.json keys that judge an adapter (the artifact's metadata carries them)
EVAL_METRICS = (
    "eval_loss_before",
    "eval_loss",
    "perplexity_before",
    "perplexity",
    "exact_match_before",
    "exact_match",
    "exact_match_samples",
    # method=dpo (docs/preference.md)
    "reward_accuracy_before",
    "reward_accuracy",
    "reward_margin_before",
    "reward_margin",
)


def open_wandb_run(
    cfg: TrackingConfig,
    directory: Path,
    *,
    group: str | None,
    name: str,
    job_type: str,
    tags: list[str],
    config: dict[str, Any],
) -> Any:
    """A W&B run with its files in `directory/wandb` and its id in `directory/wandb_run_id.txt`, so a
    rerun in the same directory continues that W&B run instead of adding one (offline, each attempt
    is an `offline-run-*-ID` folder with the same id; `wandb sync` joins them in order)."""
    id_file = directory / WANDB_RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    import wandb  # noqa: PLC0415  (see the note at the top)

    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        group=group,
        name=name,
        job_type=job_type,
        tags=list(dict.fromkeys(tags)),
        config=redact_secrets(config),
        dir=str(directory),
        mode=cfg.mode,  # type: ignore[arg-type]  # validated by the schema
        id=run_id,
        resume="allow",
    )
    id_file.write_text(run_id + "\n", encoding="utf-8")
    log.info("W&B run %s (%s mode) in %s", run_id, cfg.mode, directory / "wandb")
    return run


class Tracker:
    """A W&B run (or nothing, for tracking=none) with log/summary/artifact/finish."""

    def __init__(self, cfg: TrackingConfig, run: RunContext, config: dict[str, Any]) -> None:
        run_dir = run.path
        self.run_dir = run_dir
        self.cfg = cfg
        self.run: Any = None
        if not is_main_process():
            return
        if cfg.backend == "none" or cfg.mode == "disabled":
            log.info("tracking off (tracking.backend=%s, tracking.mode=%s)", cfg.backend, cfg.mode)
            return
        group, name = run.tracking_group_and_name()
        self.run = open_wandb_run(
            cfg,
            run_dir,
            group=cfg.group or group,
            name=cfg.name or name,
            job_type=cfg.job_type,
            tags=[*cfg.tags, *run.tracking_tags()],
            config={**config, **run.tracking_config()},
        )

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
            import wandb  # noqa: PLC0415  (see the note at the top)

            table = wandb.Table(columns=columns, data=[[row[n] for n in names] for row in rows])
            self.run.log({key: table}, step=step)

    def summarize(self, metrics: dict[str, Any]) -> None:
        """Put final metrics in the run summary."""
        if self.run is not None:
            self.run.summary.update(metrics)

    def log_adapter(self, schema: Config, metrics: dict[str, Any]) -> None:
        """The saved adapter/ and tokenizer/ (nothing else: never base weights) as a W&B artifact of
        type `model`, with what it takes to rebuild and judge it as metadata: base model and
        revision, LoRA config, data fingerprint, git commit, eval metrics. `tracking.log_adapter=false`
        turns it off. Offline, the artifact is recorded in the run's .wandb file and uploaded by
        `wandb sync` (`qlora-sync`)."""
        if self.run is None or not self.cfg.log_adapter:
            return
        provenance = json.loads((self.run_dir / PROVENANCE).read_text(encoding="utf-8"))
        metadata = {
            "base_model": schema.model.name_or_path,
            "base_model_revision": schema.model.revision,
            "lora": to_plain_dict(schema.lora),
            "data_fingerprint": provenance.get("data_fingerprint"),
            "git_commit": provenance["git"]["commit"],
            "git_dirty": provenance["git"]["dirty"],
            "metrics": {key: metrics[key] for key in EVAL_METRICS if key in metrics},
        }
        import wandb  # noqa: PLC0415  (see the note at the top)

        artifact = wandb.Artifact(
            f"adapter-{self.run.id}",
            type=ARTIFACT_TYPE,
            description=f"LoRA adapter and tokenizer for {schema.model.name_or_path}",
            metadata=metadata,
        )
        for directory in (ADAPTER_DIR, TOKENIZER_DIR):
            # "immutable": W&B reads the files in place at upload instead of copying each adapter into
            # its staging directory (~/.local/share/wandb): they are final, a COMPLETED run
            # directory is never written again.
            artifact.add_dir(str((self.run_dir / directory).resolve()), name=directory, policy="immutable")
        self.run.log_artifact(artifact)
        log.info("logged %s and %s as W&B artifact %s", ADAPTER_DIR, TOKENIZER_DIR, artifact.name)

    def finish(self, failed: bool) -> None:
        """Close the run; a failed job is marked with a non-zero exit code in W&B."""
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None


class TrackingCallback(TrainerCallback):
    """Forwards the Trainer's logs (loss, lr, grad norm, eval) to the tracker, and rewrites the
    run directory's log_history.json from the Trainer's state, for plots without W&B
    (`qlora-compare`): transformers writes it only inside checkpoints. A resumed run restores
    the state's history, so the file stays whole. `perplexity`: log exp(eval_loss) beside it, which
    means something for a cross-entropy loss (SFT), not for a preference loss (DPO)."""

    def __init__(self, tracker: Tracker, perplexity: bool = True) -> None:
        self.tracker = tracker
        self.perplexity = perplexity

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs and state.is_world_process_zero:
            evaluated = self.perplexity and "eval_loss" in logs
            extra = {"eval_perplexity": perplexity(logs["eval_loss"])} if evaluated else {}
            self.tracker.log({**logs, **extra}, step=state.global_step)
            write_json_atomic(self.tracker.run_dir / HISTORY_FILE, state.log_history)
