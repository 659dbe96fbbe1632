"""The training loop: transformers' Trainer, configured from `TrainerConfig`, plus our metrics."""

from __future__ import annotations

import itertools
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from peft import PeftModel
from transformers import (
    EarlyStoppingCallback,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from qlora_exp.baseline import BaselineCache, BaselineEvaluationMixin
from qlora_exp.checkpoint import AtomicCheckpointTrainer, logged_train_loss, tokens_before
from qlora_exp.data.module import DataModule
from qlora_exp.errors import QloraError
from qlora_exp.precision import resolve_precision
from qlora_exp.run.directory import CHECKPOINTS_DIR
from qlora_exp.run.distributed import parameters_agree_across_ranks
from qlora_exp.schema import TrainerConfig

log = logging.getLogger(__name__)


def build_training_arguments(
    cfg: TrainerConfig,
    run_dir: Path,
    seed: int,
    arguments_class: type[TrainingArguments] = TrainingArguments,
    **method_arguments: Any,
) -> TrainingArguments:
    """TrainingArguments from our schema; what the user does not set is fixed here, on purpose. A
    method's trainer takes its own subclass (TRL's DPOConfig) with its `method_arguments`."""
    precision = resolve_precision(cfg.precision)
    return arguments_class(
        output_dir=str(run_dir / CHECKPOINTS_DIR),
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        train_sampling_strategy=cfg.train_sampling_strategy,
        dataloader_num_workers=cfg.dataloader_num_workers,
        # Batches are pinned (dataloader_pin_memory's default) and copied to the GPU asynchronously: a
        # blocking copy waits for the GPU to finish the previous step before the host may queue more.
        accelerator_config={"non_blocking": torch.cuda.is_available()},
        eval_strategy="steps" if cfg.eval_steps > 0 else "no",
        eval_steps=cfg.eval_steps or None,
        # The "before" evaluation runs inside train(), after the model is wrapped for DDP. Calling
        # evaluate() before train() registers the bare model with accelerate, and train() then skips
        # the DDP wrapper: ranks silently train apart (transformers 5.24; test_distributed guards it).
        eval_on_start=True,
        # Resumable checkpoints, written atomically by AtomicCheckpointTrainer (qlora_exp/checkpoint.py).
        # load_best_model_at_end can only reload what was saved: then a checkpoint follows every eval.
        save_strategy="steps",
        save_steps=cfg.eval_steps if cfg.load_best_model_at_end else cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=cfg.load_best_model_at_end,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        auto_find_batch_size=cfg.auto_find_batch_size,
        # Log NaN/inf losses as they are (the default hides them); NonFiniteGuard stops the run.
        logging_nan_inf_filter=False,
        # Without an accelerator, say so: accelerate then runs multi-process CPU DDP over gloo.
        use_cpu=not torch.cuda.is_available(),
        report_to="none",  # tracking goes through qlora_exp.tracking (see why there)
        seed=seed,
        data_seed=seed,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        disable_tqdm=True,
        **method_arguments,
    )


def peak_memory() -> dict[str, Any]:
    """Peak accelerator memory allocated by torch, or the process's peak RSS on the CPU."""
    if torch.cuda.is_available():
        return {
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
            "peak_memory_kind": "cuda_allocated",
        }
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_gb": rss_kb / 2**20, "peak_memory_kind": "cpu_max_rss"}


def check_peak_memory(expected_gb: float | None, measured: dict[str, Any]) -> None:
    """Warn when the GPU peak exceeded the configured `peak_memory_gb`, from which
    hydra/launcher=gpu_share decides how many jobs share a GPU."""
    if expected_gb is None or measured["peak_memory_kind"] != "cuda_allocated":
        return
    if measured["peak_memory_gb"] > expected_gb:
        log.warning(
            "peak GPU memory %.1f GiB is above peak_memory_gb=%g: jobs sized from it may run out of "
            "memory side by side (hydra/launcher=gpu_share). Fix: peak_memory_gb=%.1f",
            measured["peak_memory_gb"],
            expected_gb,
            math.ceil(measured["peak_memory_gb"] * 10) / 10,
        )


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged run gives a large number rather than an overflow."""
    return math.exp(min(loss, 50.0))


# Counts the jobs this process has started: a sweep's basic and joblib launchers run several in one.
_JOBS_IN_PROCESS = itertools.count()


def job_start_time() -> float:
    """When this job started (epoch seconds): the process's start for its first job, so that the
    interpreter's and torch's imports count, and now for any later job of the same process."""
    if next(_JOBS_IN_PROCESS) == 0:
        return psutil.Process().create_time()
    return time.time()


class StartupTimer(TrainerCallback):
    """How long a job takes to get going: from its start (`job_start_time`) to the Trainer's
    train begin (data, model loaded) and to the end of its first optimizer step (which includes the
    evaluation and samples before training and the first step's compiles). A sweep pays this once
    per job; the compile and baseline caches are what shorten it (README, "Sweeps")."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.metrics: dict[str, float] = {}

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.metrics["startup_seconds_to_train_begin"] = time.time() - self.started

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if "startup_seconds" in self.metrics:
            return
        self.metrics["startup_seconds"] = time.time() - self.started
        log.info(
            "start-up: first optimizer step done %.1f s after the job started (training began at %.1f s)",
            self.metrics["startup_seconds"],
            self.metrics["startup_seconds_to_train_begin"],
        )


def build_evaluation_callbacks(cfg: TrainerConfig) -> list[TrainerCallback]:
    """Trainer's own early stopping on eval_loss, when trainer.early_stopping_patience is set."""
    if cfg.early_stopping_patience is None:
        return []
    return [EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience)]


def eval_history(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Every evaluation in the Trainer's log: before training (step 0), every eval_steps, after."""
    return [
        {"step": e["step"], "eval_loss": e["eval_loss"], "perplexity": perplexity(e["eval_loss"])}
        for e in log_history
        if "eval_loss" in e
    ]


class DeviceTokenCountMixin:
    """Counts the tokens seen on the device and reads the count back only where it is read: a log
    (`Trainer.log`, which also ends `train()`) or a checkpoint (whose trainer_state.json holds it).

    transformers' Trainer (5.24, `_track_num_input_tokens`) reads it back with `.item()` after every
    micro-batch: a host-device sync that makes the host wait for the whole backward, so the GPU then
    idles while the host steps the optimizer, collates and moves the next batch and launches its
    forward. Without it the host queues the next step while the GPU still runs this one. The count is
    the Trainer's own (same rule, same `state.num_input_tokens_seen` wherever that is read). Mix in
    before the Trainer class.
    """

    _pending_tokens: torch.Tensor | None = None

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        trainer: Trainer = self  # type: ignore[assignment]  # a mixin of Trainer subclasses
        name = getattr(trainer.model, "main_input_name", "input_ids")
        pad_id = getattr(trainer.processing_class, "pad_token_id", None)
        # The Trainer's "non_padding" rule, the mode build_training_arguments sets; any other mode or
        # input is left to the Trainer itself (its warnings included).
        if trainer.args.include_num_input_tokens_seen != "non_padding" or name not in inputs:
            count = None
        elif "attention_mask" in inputs:
            count = inputs["attention_mask"].sum()
        elif pad_id is not None:
            count = (inputs[name] != pad_id).sum()
        else:
            count = None
        if count is None:
            super()._track_num_input_tokens(inputs)  # type: ignore[misc]
            return
        count = trainer.accelerator.gather(count.to(device=trainer.args.device, dtype=torch.int64)).sum()
        self._pending_tokens = count if self._pending_tokens is None else self._pending_tokens + count

    def settle_token_count(self) -> None:
        """Add the tokens counted on the device since the last read to `state.num_input_tokens_seen`."""
        if self._pending_tokens is not None:
            trainer: Trainer = self  # type: ignore[assignment]
            trainer.state.num_input_tokens_seen += int(self._pending_tokens.item())
            self._pending_tokens = None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self.settle_token_count()
        super().log(logs, start_time)  # type: ignore[misc]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self.settle_token_count()
        super()._save_checkpoint(model, trial)  # type: ignore[misc]


class SupervisedTrainer(DeviceTokenCountMixin, BaselineEvaluationMixin, AtomicCheckpointTrainer):
    """transformers' Trainer with atomic checkpoints, a step-0 evaluation a sweep's jobs share, and no
    host-device sync per micro-batch for its token count."""


def build_trainer(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    data: DataModule,
    args: TrainingArguments,
    baseline: BaselineCache | None = None,
) -> Trainer:
    """A Trainer (atomic checkpoints) over the DataModule's datasets and dynamic-padding collator; the
    run adds its callbacks (`Trainer.add_callback`), as it does to every method's trainer. `baseline`:
    where the untrained model's evaluation is shared (qlora_exp/baseline.py), None to compute it."""
    trainer = SupervisedTrainer(
        model=model,
        args=args,
        train_dataset=data.train_dataset,
        eval_dataset=data.val_dataset,
        data_collator=data.collator(),
        processing_class=tokenizer,
    )
    trainer.baseline = baseline
    return trainer


def final_evaluation(trainer: Trainer) -> dict[str, float]:
    """The trained model's evaluation metrics (eval_loss and whatever the trainer adds): those of the
    evaluation at the last step when the Trainer ran one (eval_steps divides the steps) and kept that
    model, else a new evaluation."""
    last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
    if (
        last is not None
        and last["step"] == trainer.state.global_step > 0
        and not trainer.args.load_best_model_at_end  # then the model was reloaded: evaluate it
    ):
        return {key: float(value) for key, value in last.items() if key.startswith("eval_")}
    return trainer.evaluate()


def train_and_measure(
    trainer: Trainer, resume_from: Path | None = None
) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """Train (from `resume_from` if given) with an evaluation first and last on the same in-memory
    model; returns the evaluation before training, the one after, and what the run measured (loss,
    steps, tokens, speed, memory). Every method's metrics are built from these."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    tokens_at_start = tokens_before(resume_from)  # read now: rotation may delete that checkpoint
    # Evaluates first (eval_on_start); a resumed run keeps its step-0 evaluation in the log history.
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    before = next(entry for entry in trainer.state.log_history if "eval_loss" in entry)
    after = final_evaluation(trainer)
    runtime = float(result.metrics["train_runtime"])
    tokens = int(trainer.state.num_input_tokens_seen)
    measured = {
        # A resumed Trainer reports the loss of this session's steps only; use the whole run's log.
        "train_loss": logged_train_loss(trainer.state) if resume_from else float(result.training_loss),
        "train_steps": int(trainer.state.global_step),
        "train_tokens": tokens,
        "train_tokens_per_second": (tokens - tokens_at_start) / runtime if runtime > 0 else 0.0,
        "train_runtime_s": runtime,
        "world_size": trainer.args.world_size,
        "effective_batch_size": trainer.args.per_device_train_batch_size
        * trainer.args.gradient_accumulation_steps
        * trainer.args.world_size,
        "ranks_agree": parameters_agree_across_ranks(trainer.model),  # type: ignore[arg-type]
        **peak_memory(),
    }
    if not measured["ranks_agree"]:
        raise QloraError(
            "data-parallel ranks ended with different adapter weights: gradients were not synchronised. "
            "Fix: report this with train.log; do not use this run's adapter"
        )
    return before, after, measured


def train_and_evaluate(trainer: Trainer, resume_from: Path | None = None) -> dict[str, Any]:
    """Train (SFT) and return metrics.json's figures: eval loss and perplexity before and after."""
    before_metrics, after_metrics, measured = train_and_measure(trainer, resume_from)
    before, after = before_metrics["eval_loss"], after_metrics["eval_loss"]
    log.info("eval_loss before training: %.4f", before)
    metrics = {
        "eval_loss_before": float(before),
        "eval_loss": float(after),
        "perplexity_before": perplexity(before),
        "perplexity": perplexity(after),
        **measured,
        "eval_history": eval_history(trainer.state.log_history),
    }
    log.info(
        "eval_loss %.4f -> %.4f, train_loss %.4f, %.0f tokens/s, %.1f s",
        before,
        after,
        metrics["train_loss"],
        metrics["train_tokens_per_second"],
        metrics["train_runtime_s"],
    )
    return metrics
