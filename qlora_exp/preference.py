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
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase, Trainer
from trl import DPOConfig, DPOTrainer

from qlora_exp.checkpoint import AtomicCheckpointMixin
from qlora_exp.data.module import DataModule
from qlora_exp.errors import ConfigError, RunDirectoryError
from qlora_exp.model import (
    GRADIENT_CHECKPOINTING_KWARGS,
    attach_lora,
    attach_saved_adapter,
    load_trainable_base,
)
from qlora_exp.run.directory import ADAPTER_DIR, config_diff
from qlora_exp.run.finished import FinishedRun
from qlora_exp.schema import Config, to_plain_dict
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
# Settings of the base model an adapter was trained on, which its continuation must share.
BASE_MODEL_KEYS = ("name_or_path", "revision")


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


def starting_run(cfg: DictConfig, schema: Config) -> tuple[DictConfig, FinishedRun | None]:
    """The finished run `method.init_from` names, and the config to run with, before any data or
    weights load. The base model must be the run's: an adapter only fits the model it was trained on.
    The adapter's shape (lora.*) and the chat template it learnt are the run's too: where this run
    leaves them at their defaults they are taken from the run (logged, and written into this run's
    resolved config); another value set here is refused, as it could not be honoured. (cfg, None)
    without init_from."""
    if schema.method.init_from is None:
        return cfg, None
    try:
        start = FinishedRun(Path(schema.method.init_from).expanduser())
    except RunDirectoryError as exc:
        raise ConfigError(f"method.init_from: {exc}") from exc
    trained = start.config
    for key in BASE_MODEL_KEYS:
        ours, theirs = getattr(schema.model, key), getattr(trained.model, key)
        if ours != theirs:
            raise ConfigError(
                f"method.init_from: {start.path} was trained on model.{key}={theirs!r}, this run loads "
                f"{ours!r}; an adapter only fits the base model it was trained on. Fix: set model.{key}="
                f"{theirs} (or the model preset that run used), or start from a run of this model"
            )
    ours, theirs, defaults = (adapter_settings(c) for c in (schema, trained, Config(model=schema.model)))
    taken = {key: theirs[key] for key in ours if ours[key] != theirs[key] and ours[key] == defaults[key]}
    conflicts = [key for key in ours if ours[key] != theirs[key] and key not in taken]
    if conflicts:
        raise ConfigError(
            f"method.init_from: the adapter of {start.path} was trained with "
            + ", ".join(f"{key}={theirs[key]}" for key in conflicts)
            + ", this run sets "
            + ", ".join(f"{key}={ours[key]}" for key in conflicts)
            + "; the adapter's shape and the template it learnt are the run's. Fix: leave them unset "
            "(they are taken from the run) or pass the run's values"
        )
    if taken:
        log.info("method.init_from: from %s: %s", start.path, ", ".join(f"{k}={v}" for k, v in taken.items()))
    base = config_diff(to_plain_dict(trained.model), to_plain_dict(schema.model))
    if base:
        log.warning(
            "method.init_from: %s loaded its base model with other settings (%s); continuing with this run's",
            start.path,
            ", ".join(f"model.{key}: {before} -> {now}" for key, (before, now) in base.items()),
        )
    nested: dict[str, dict[str, Any]] = {}
    for key, value in taken.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    return (OmegaConf.merge(cfg, nested) if nested else cfg), start  # type: ignore[return-value]


def adapter_settings(cfg: Config) -> dict[str, Any]:
    """What an adapter is tied to beyond its base model: its LoRA shape (dropout aside: it is off under
    DPO) and the chat template its data was rendered with."""
    lora = {f"lora.{key}": value for key, value in to_plain_dict(cfg.lora).items() if key != "dropout"}
    return {**lora, "data.chat_template": cfg.data.chat_template}


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
