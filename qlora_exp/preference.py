"""Preference tuning (method=dpo): TRL's DPOTrainer on the same 4-bit model, data module, run directory,
callbacks, atomic checkpoints and resume as SFT.

The reference model is never a second copy of the model. A fresh adapter's reference is the base
model with the adapter disabled: TRL's own path for a new adapter. With `method.init_from=RUN_DIR`
the policy starts from that finished run's adapter (trainable), and the reference is that same
starting point: TRL keeps a frozen copy of the adapter (an adapter's size, not a model's) under the
name "ref" and switches to it for the reference forward. That is DPO's reference, the model the
preference stage starts from (the SFT model), rather than the base the SFT run started from.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import peft
from transformers import PreTrainedTokenizerBase, Trainer
from trl import DPOConfig, DPOTrainer

from qlora_exp.checkpoint import AtomicCheckpointMixin
from qlora_exp.data.module import DataModule
from qlora_exp.model import (
    GRADIENT_CHECKPOINTING_KWARGS,
    attach_lora,
    attach_saved_adapter,
    load_trainable_base,
)
from qlora_exp.run.directory import ADAPTER_DIR
from qlora_exp.run.finished import FinishedRun
from qlora_exp.schema import Config
from qlora_exp.training import DeviceTokenCountMixin, build_training_arguments, train_and_measure

log = logging.getLogger(__name__)

REFERENCE_ADAPTER = "ref"  # TRL's name for its frozen copy of the adapter it was given
# TRL's evaluation log keys -> metrics.json names (with `_before` for the evaluation at step 0).
REWARD_METRICS = {
    "eval_rewards/accuracies": "reward_accuracy",
    "eval_rewards/margins": "reward_margin",
    "eval_rewards/chosen": "reward_chosen",
    "eval_rewards/rejected": "reward_rejected",
    "eval_logps/chosen": "logps_chosen",
    "eval_logps/rejected": "logps_rejected",
}


class PreferenceTrainer(DeviceTokenCountMixin, AtomicCheckpointMixin, DPOTrainer):
    """TRL's DPOTrainer with the project's atomic checkpoints and token count (DeviceTokenCountMixin),
    over data that PreferenceDataModule has already tokenized with exact masks, and with the adapter
    kept as the project's model factory made it.

    Two things TRL does on construction are undone here, for reasons it cannot know:
    - it casts a quantized model's trainable weights to bf16 (the QLoRA paper's choice). At a DPO
      learning rate (1e-6..5e-5) an Adam step (about the learning rate) is below bf16's resolution at
      a LoRA weight's size (~1e-4 at 1e-2) and rounds away: 3 steps at 5e-6 on the tiny model changed
      1.2% of lora_A's entries in bf16, 99.97% in fp32. The factory's fp32 weights are restored,
      values included, as SFT trains them.
    - given a PeftModel, it copies the adapter as the frozen reference. A fresh adapter is zero in
      effect (LoRA's B starts at 0), so its copy is the base model: `fresh_adapter` deletes the copy
      and TRL disables the adapter for the reference instead (its path for a new adapter), so no
      second set of adapter (and modules_to_save) weights is kept or run.
    """

    def __init__(self, model: peft.PeftModel, *, fresh_adapter: bool, **kwargs: Any) -> None:
        factory_weights = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
        }
        super().__init__(model=model, **kwargs)
        for name, param in model.named_parameters():
            if name in factory_weights:
                param.data = factory_weights[name]
        if fresh_adapter:
            model.delete_adapter(REFERENCE_ADAPTER)

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        # TRL would render and tokenize text columns again; PreferenceDataModule's datasets are already
        # TRL's prompt_ids / chosen_ids / rejected_ids, masked as SFT masks (qlora_exp/data/preference.py).
        return dataset


def build_preference_trainer(
    cfg: Config,
    tokenizer: PreTrainedTokenizerBase,
    data: DataModule,
    run_dir: Path,
    start: FinishedRun | None,
) -> PreferenceTrainer:
    """The policy (a fresh adapter, or `start`'s) on the 4-bit base, in TRL's DPOTrainer."""
    base = load_trainable_base(cfg.model)
    model = (
        attach_lora(base, cfg.lora) if start is None else attach_saved_adapter(base, start.path / ADAPTER_DIR)
    )
    if cfg.lora.dropout > 0:
        log.info(
            "method=dpo: dropout is off (TRL's disable_dropout), so lora.dropout=%g does not apply",
            cfg.lora.dropout,
        )
    args = build_training_arguments(
        cfg.trainer,
        run_dir,
        cfg.seed,
        DPOConfig,
        beta=cfg.method.beta,
        loss_type=[cfg.method.loss_type],
        max_length=None,  # data.max_length is applied by the data module, with data.overlength's policy
        # TRL re-enables checkpointing (and turns it off around the reference forward) with these;
        # transformers 5 names them activation_checkpointing (gradient_checkpointing is the old alias).
        activation_checkpointing=cfg.model.gradient_checkpointing,
        activation_checkpointing_kwargs=dict(GRADIENT_CHECKPOINTING_KWARGS),
    )
    assert isinstance(args, DPOConfig)
    log.info(
        "DPO: beta %g, loss %s, reference: %s",
        cfg.method.beta,
        cfg.method.loss_type,
        "the base model (adapter disabled)" if start is None else f"the adapter of {start.path}, frozen",
    )
    return PreferenceTrainer(
        model,
        fresh_adapter=start is None,
        args=args,
        train_dataset=data.train_dataset,
        eval_dataset=data.val_dataset,
        data_collator=data.collator(),
        processing_class=tokenizer,
    )


def reward_metrics(evaluation: dict[str, float], suffix: str = "") -> dict[str, float]:
    """metrics.json's reward figures from one evaluation's log entry."""
    return {
        name + suffix: float(evaluation[key]) for key, name in REWARD_METRICS.items() if key in evaluation
    }


def train_and_evaluate_preference(trainer: Trainer, resume_from: Path | None = None) -> dict[str, Any]:
    """Train (DPO) and return metrics.json's figures: the DPO loss and the reward figures on the held-out
    pairs before and after training (reward accuracy: how often the chosen answer's implicit reward
    beta * log(pi/pi_ref) beats the rejected one's; margin: by how much), plus the run's measurements."""
    before, after, measured = train_and_measure(trainer, resume_from)
    metrics = {
        "eval_loss_before": float(before["eval_loss"]),
        "eval_loss": float(after["eval_loss"]),
        **reward_metrics(before, "_before"),
        **reward_metrics(after),
        **measured,
        "eval_history": [
            {"step": entry["step"], "eval_loss": entry["eval_loss"], **reward_metrics(entry)}
            for entry in trainer.state.log_history
            if "eval_loss" in entry
        ],
    }
    log.info(
        "DPO eval_loss %.4f -> %.4f, reward accuracy %.3f -> %.3f, margin %.4f -> %.4f, %.0f tokens/s",
        metrics["eval_loss_before"],
        metrics["eval_loss"],
        metrics.get("reward_accuracy_before", float("nan")),
        metrics.get("reward_accuracy", float("nan")),
        metrics.get("reward_margin_before", float("nan")),
        metrics.get("reward_margin", float("nan")),
        metrics["train_tokens_per_second"],
    )
    return metrics
