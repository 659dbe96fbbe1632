"""One setting on the shared 4-bit base: its model, its batches, its training steps, their timing.

The batches come from the training path's collator (`qlora_exp.data.packing.build_collator`), so a
padding-free setting times exactly the batches `data.packing=padding_free` trains on, use_cache=False
included: without it, the flattened examples would attend to each other (see qlora_exp/data/packing.py).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from torch._dynamo.utils import counters as dynamo_counters
from torch.utils.hooks import RemovableHandle
from transformers import (
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    set_seed,
)

from qlora_exp.attention import set_flex_attention, trainable_attention
from qlora_exp.bench.options import BenchOptions
from qlora_exp.bench.recorder import StepRecorder
from qlora_exp.bench.settings import Setting
from qlora_exp.data.packing import FlatteningCollator, build_collator
from qlora_exp.guards import NonFiniteGuard, QuantizedWeightGuard
from qlora_exp.layer_compile import (
    compile_decoder_layers,
    layers_compile,
    set_uncheckpointed_layers,
    uncompile_decoder_layers,
)
from qlora_exp.model import apply_liger, attach_lora, load_trainable_base
from qlora_exp.multimodal import attention_implementations
from qlora_exp.precision import resolve_compute_dtype, set_unquantized_precision
from qlora_exp.schema import LoraConfig, ModelConfig, TrainerConfig
from qlora_exp.training import SupervisedTrainer, build_training_arguments, peak_memory

log = logging.getLogger(__name__)

FLOP_FORMULA = (
    "MFU = real tokens/s x 4 N / peak; N = all parameters of the base model (the tied LM head counted "
    "once); 4 N = forward 2 N + backward input-gradients 2 N (frozen base: no weight gradients). "
    "Not counted: LoRA's own matmuls, attention scores, the gradient-checkpointing recompute (+2 N)."
)
# A bench layout as the training path's `data.packing` mode (pad_to_max also pads to --max-length).
LAYOUT_PACKING = {"pad_to_max": "none", "dynamic_padding": "none", "padding_free": "padding_free"}


@dataclass
class SettingResult:
    """What one setting measured."""

    setting: Setting
    steps: int = 0
    warmup_steps: int = 0
    accumulation: int = 1
    step_seconds: list[float] = field(default_factory=list)
    step_real_tokens: list[int] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    real_tokens_per_s: float | None = None
    mfu: float | None = None
    peak_memory_gb: float | None = None
    peak_memory_kind: str = ""
    mean_loss_first_k: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, the setting flattened in."""
        out = asdict(self)
        out["setting"] = asdict(self.setting)
        return out


@dataclass(frozen=True)
class Shared:
    """What every setting of one run shares: the base (loaded once), the examples, the options."""

    base: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    dataset: Dataset
    lora_cfg: LoraConfig
    compute_dtype: str  # the model preset's bnb_4bit_compute_dtype
    options: BenchOptions
    out_dir: Path


@dataclass(frozen=True)
class StepPlan:
    """How many bench steps a setting takes, and how each splits into micro-batches and optimizer steps."""

    warmup_steps: int
    timed_end: int  # bench steps up to the end of the timed ones (the loss steps included)
    steps: int  # timed_end, plus one profiled step when asked
    examples_per_step: int  # examples per bench step
    micro_batches: int  # per bench step
    optimizer_steps: int  # per bench step: 1, or one per micro-batch for the prototype's way
    profile: bool

    @property
    def accumulation(self) -> int:
        """Micro-batches accumulated into one optimizer step."""
        return self.micro_batches // self.optimizer_steps


def plan_steps(setting: Setting, options: BenchOptions) -> StepPlan:
    """The steps of `setting`: compiled attention warms up one step longer, a profiled step comes last."""
    # Compiled attention and layers compile for the first shape, then once more for dynamic shapes.
    compiled = setting.attn_implementation == "flex_attention" or setting.compile_layers
    warmup = options.warmup_steps + (1 if compiled else 0)
    timed_end = max(options.loss_steps, warmup + options.timed_steps)
    profile = options.profile == setting.name
    examples_per_step = setting.steps_of(options.examples_per_step)
    micro_batches = examples_per_step // setting.micro_batch
    return StepPlan(
        warmup_steps=warmup,
        timed_end=timed_end,
        # A profiled step runs slower; it is one extra step at the end, outside the timing.
        steps=timed_end + (1 if profile else 0),
        examples_per_step=examples_per_step,
        micro_batches=micro_batches,
        optimizer_steps=micro_batches if setting.step_every_micro_batch else 1,
        profile=profile,
    )


def layout_collator(
    layout: str, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> DataCollatorForSeq2Seq | FlatteningCollator:
    """The training path's collator for a bench layout (see LAYOUT_PACKING)."""
    pad_to = max_length if layout == "pad_to_max" else None
    return build_collator(LAYOUT_PACKING[layout], tokenizer, pad_to=pad_to)


def step_real_tokens(examples: Dataset, plan: StepPlan) -> list[int]:
    """Non-pad tokens of each bench step: the numerator of tokens/s, the same whatever the layout."""
    lengths = [len(ids) for ids in examples["input_ids"]]
    size = plan.examples_per_step
    return [sum(lengths[i * size : (i + 1) * size]) for i in range(plan.steps)]


def load_shared_base(model_cfg: ModelConfig, attn_implementation: str) -> PreTrainedModel:
    """The base every setting shares: no Liger, no precision hooks, torch's flex blocks; each setting
    switches what it needs."""
    return load_trainable_base(
        replace(
            model_cfg,
            use_liger_kernel=False,
            fp32_residual=False,
            attn_implementation=attn_implementation,
            flex_block_size=None,
            flex_kernel_options=None,
            uncheckpointed_layers=0,
        )
    )


def prepare_base(base: PreTrainedModel, setting: Setting, compute_dtype: str) -> list[RemovableHandle]:
    """Switch the shared base to the setting's attention, precision and kernels; returns hooks to remove.

    Unquantized params go to fp32 (peft's default) or the compute dtype; the cast is lossless both ways
    because the checkpoint holds them in the compute dtype. Liger cannot be undone (order_settings).
    """
    base.set_attn_implementation(attention_implementations(base.config, setting.attn_implementation))
    set_flex_attention(base, setting.flex_block_size, setting.flex_kernel_options)
    hooks = set_unquantized_precision(
        base,
        upcast=setting.upcast_unquantized_params,
        fp32_residual=setting.fp32_residual,
        compute_dtype=resolve_compute_dtype(compute_dtype),
    )
    if setting.use_liger_kernel:
        apply_liger(base, layer_kernels=not setting.compile_layers)
    if setting.compile_layers:
        compile_decoder_layers(base)
    set_uncheckpointed_layers(base, setting.uncheckpointed_layers)
    return hooks


class BenchTrainer(SupervisedTrainer):
    """The training path's trainer, keeping each micro-batch's loss on the device.

    The Trainer reads its loss back when it logs, a host-device sync; logging every step to get
    per-step losses would time syncs that training (logging every trainer.logging_steps) does not
    have. The losses are read once, after training.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.micro_batch_losses: list[torch.Tensor] = []

    def training_step(
        self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.micro_batch_losses.append(loss)  # what the Trainer adds to the loss it logs
        return loss

    def step_losses(self) -> list[float]:
        """Each optimizer step's loss as the Trainer would log it at logging_steps=1."""
        per_step = self.args.gradient_accumulation_steps
        if not self.micro_batch_losses:
            return []
        values = torch.stack(self.micro_batch_losses).float().tolist()
        return group_sums(values, per_step)


def build_trainer(
    setting: Setting, model: torch.nn.Module, examples: Dataset, plan: StepPlan, shared: Shared
) -> tuple[BenchTrainer, StepRecorder]:
    """A trainer over the setting's examples in order, with training's per-step guards and the
    recorder that times its steps."""
    options = shared.options
    max_steps = plan.steps * plan.optimizer_steps
    trainer_cfg = TrainerConfig(
        max_steps=max_steps,
        per_device_train_batch_size=setting.micro_batch,
        gradient_accumulation_steps=plan.accumulation,
        learning_rate=options.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim=setting.optim or options.optim,
        logging_steps=max_steps,  # the losses come from BenchTrainer: no log, no sync, between steps
        train_sampling_strategy="sequential",
        eval_steps=0,  # the bench has no eval set: nothing but the training steps is timed
    )
    recorder = StepRecorder(
        profile_step=plan.timed_end * plan.optimizer_steps if plan.profile else None,
        profile_path=shared.out_dir / f"profile_{setting.name}.txt" if plan.profile else None,
    )
    training_args = build_training_arguments(
        trainer_cfg, shared.out_dir / "trainer" / setting.name, options.seed
    )
    training_args.eval_on_start = False  # training measures its "before" loss; the bench has no eval set
    trainer = BenchTrainer(
        model=model,
        args=training_args,
        train_dataset=examples,
        data_collator=layout_collator(setting.layout, shared.tokenizer, options.max_length),
        processing_class=shared.tokenizer,
        callbacks=[NonFiniteGuard(trainer_cfg.nan_guard_patience), QuantizedWeightGuard(), recorder],
    )
    trainer.remove_callback(PrinterCallback)  # the table and the log say it; no dict per step on stdout
    return trainer, recorder


def count_flops_per_token(model: torch.nn.Module) -> float:
    """4 N: see FLOP_FORMULA. N counts 4-bit weights by their logical size, LoRA excluded."""
    total = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        quant_state = getattr(param, "quant_state", None)
        total += int(torch.Size(quant_state.shape).numel()) if quant_state is not None else param.numel()
    return 4.0 * total


def group_sums(values: list[float], size: int) -> list[float]:
    """Sums of consecutive groups of `size` values (optimizer steps -> bench steps)."""
    return [sum(values[i : i + size]) for i in range(0, len(values) - size + 1, size)]


def summarise(
    result: SettingResult, trainer: BenchTrainer, recorder: StepRecorder, plan: StepPlan, shared: Shared
) -> None:
    """Fill `result` from what the run saw: per-step seconds and losses, tokens/s, MFU, memory."""
    per_step = plan.optimizer_steps
    result.step_seconds = group_sums(recorder.seconds, per_step)
    result.step_losses = [loss / per_step for loss in group_sums(trainer.step_losses(), per_step)]
    timed = slice(plan.warmup_steps, plan.timed_end)
    seconds = sum(result.step_seconds[timed])
    result.real_tokens_per_s = sum(result.step_real_tokens[timed]) / seconds if seconds > 0 else None
    # peak_tflops=0 turns MFU off (benchmarks/moe_experts.py: a MoE activates few of its parameters).
    if result.real_tokens_per_s is not None and torch.cuda.is_available() and shared.options.peak_tflops > 0:
        flops = count_flops_per_token(shared.base) * result.real_tokens_per_s
        result.mfu = flops / (shared.options.peak_tflops * 1e12)
    k = shared.options.loss_steps
    comparable = not result.setting.step_every_micro_batch and len(result.step_losses) >= k
    result.mean_loss_first_k = sum(result.step_losses[:k]) / k if comparable else None
    memory = peak_memory()
    result.peak_memory_gb, result.peak_memory_kind = memory["peak_memory_gb"], memory["peak_memory_kind"]


def error_text(exc: BaseException) -> str:
    """The first line of a failure, for the table: the full traceback is in the log."""
    if isinstance(exc, torch.OutOfMemoryError):
        return f"out of memory: {str(exc).splitlines()[0]}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def detach(trainer: BenchTrainer, model: PeftModel, hooks: list[RemovableHandle]) -> None:
    """Leave the shared base as it was loaded: the setting's hooks off, its LoRA layers removed."""
    for hook in hooks:
        hook.remove()
    uncompile_decoder_layers(model)
    trainer.model_wrapped = trainer.model = None  # type: ignore[assignment]
    model.unload()  # removes the LoRA layers; the base stays loaded for the next setting


def free_memory() -> None:
    """Collect the last setting's trainer and optimizer state, so the next one's peak starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_setting(setting: Setting, shared: Shared) -> SettingResult:
    """Fresh LoRA on the shared base, train the setting's steps, measure; the base is left LoRA-free.

    A failure while training is reported in the result (and the exit code), so the next setting runs.
    """
    # Where flex cannot train or layers cannot compile (CPU), the setting runs, and is reported, as eager.
    attention = trainable_attention(setting.attn_implementation)
    setting = replace(
        setting,
        attn_implementation=attention,
        flex_block_size=setting.flex_block_size if attention == "flex_attention" else None,
        flex_kernel_options=setting.flex_kernel_options if attention == "flex_attention" else None,
        compile_layers=layers_compile(setting.compile_layers),
    )
    plan = plan_steps(setting, shared.options)
    examples = shared.dataset.select(range(plan.steps * plan.examples_per_step))
    result = SettingResult(
        setting=setting,
        steps=plan.steps,
        warmup_steps=plan.warmup_steps,
        accumulation=plan.accumulation,
        step_real_tokens=step_real_tokens(examples, plan),
    )
    hooks = prepare_base(shared.base, setting, shared.compute_dtype)
    set_seed(shared.options.seed)  # the same LoRA initialisation for every setting
    lora_cfg = (
        shared.lora_cfg
        if setting.lora_dropout is None
        else replace(shared.lora_cfg, dropout=setting.lora_dropout)
    )
    model = attach_lora(shared.base, lora_cfg)
    trainer, recorder = build_trainer(setting, model, examples, plan, shared)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    log.info(
        "setting %s: %s, %d steps (%d warm-up)",
        setting.name,
        setting.description,
        plan.steps,
        plan.warmup_steps,
    )
    try:
        trainer.train()
        summarise(result, trainer, recorder, plan, shared)
        if setting.compile_layers:  # one graph per layer variant and shape kind, or layers recompile
            log.info("setting %s: torch.compile %s", setting.name, dict(dynamo_counters["stats"]))
    except Exception as exc:  # reported in the table and the exit code; the next setting runs
        result.error = error_text(exc)
        if isinstance(exc, torch.OutOfMemoryError):
            log.error("setting %s: %s", setting.name, result.error)
        else:
            log.exception("setting %s failed", setting.name)
    finally:
        detach(trainer, model, hooks)
        del trainer, model  # this frame's references too, or gc.collect cannot free them
        free_memory()
    return result
