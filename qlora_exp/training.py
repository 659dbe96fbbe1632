"""The training loop: transformers' Trainer, configured from `TrainerConfig`, plus our metrics."""

from __future__ import annotations

import logging
import math
import resource
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

from qlora_exp.checkpoint import AtomicCheckpointTrainer, logged_train_loss, tokens_before
from qlora_exp.data import DataModule
from qlora_exp.schema import TrainerConfig

log = logging.getLogger(__name__)


def resolve_precision(name: str) -> str:
    """`auto` is bf16 on a GPU that supports it, fp32 on the CPU."""
    if name != "auto":
        return name
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def build_training_arguments(cfg: TrainerConfig, run_dir: Path, seed: int) -> TrainingArguments:
    """TrainingArguments from our schema; what the user does not set is fixed here, on purpose."""
    precision = resolve_precision(cfg.precision)
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
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
        eval_strategy="no",
        # Resumable checkpoints, written atomically by AtomicCheckpointTrainer (qlora_exp/checkpoint.py).
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        auto_find_batch_size=cfg.auto_find_batch_size,
        # Log NaN/inf losses as they are (the default hides them); NonFiniteGuard stops the run.
        logging_nan_inf_filter=False,
        report_to="none",  # tracking goes through qlora_exp.tracking (see why there)
        seed=seed,
        data_seed=seed,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        disable_tqdm=True,
    )


def peak_memory() -> dict[str, Any]:
    """Peak accelerator memory allocated by torch, or the process's peak RSS on the CPU."""
    if torch.cuda.is_available():
        return {"peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30, "peak_memory_kind": "cuda_allocated"}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_gb": rss_kb / 2**20, "peak_memory_kind": "cpu_max_rss"}


def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: DataModule,
    args: TrainingArguments,
    callbacks: list[TrainerCallback],
) -> Trainer:
    """A Trainer (atomic checkpoints) over the DataModule's datasets and dynamic-padding collator."""
    return AtomicCheckpointTrainer(
        model=model,
        args=args,
        train_dataset=data.train_dataset,
        eval_dataset=data.val_dataset,
        data_collator=data.collator(),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def train_and_evaluate(trainer: Trainer, resume_from: Path | None = None) -> dict[str, Any]:
    """Evaluate, train (from `resume_from` if given), evaluate again on the same in-memory model."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    before = trainer.evaluate()["eval_loss"]
    log.info("eval_loss before training: %.4f", before)
    tokens_at_start = tokens_before(resume_from)  # read now: rotation may delete that checkpoint
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    after = trainer.evaluate()["eval_loss"]
    runtime = float(result.metrics["train_runtime"])
    tokens = int(trainer.state.num_input_tokens_seen)
    metrics = {
        "eval_loss_before": float(before),
        "eval_loss": float(after),
        "perplexity_before": math.exp(min(before, 50.0)),
        "perplexity": math.exp(min(after, 50.0)),
        # A resumed Trainer reports the loss of this session's steps only; use the whole run's log.
        "train_loss": logged_train_loss(trainer.state) if resume_from else float(result.training_loss),
        "train_steps": int(trainer.state.global_step),
        "train_tokens": tokens,
        "train_tokens_per_second": (tokens - tokens_at_start) / runtime if runtime > 0 else 0.0,
        "train_runtime_s": runtime,
        **peak_memory(),
    }
    log.info(
        "eval_loss %.4f -> %.4f, train_loss %.4f, %.0f tokens/s, %.1f s",
        before,
        after,
        metrics["train_loss"],
        metrics["train_tokens_per_second"],
        runtime,
    )
    return metrics
