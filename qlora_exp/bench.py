"""qlora-bench: one model through several trainer settings, in one process, on identical data.

Each setting trains a fresh LoRA adapter (same seed, same examples in the same order, same
optimizer steps) on the same 4-bit base, so the settings differ only in layout and kernels:
how the examples of one optimizer step are laid out in micro-batches (padded to a fixed
length, padded to the longest row, or flattened without padding with position ids restarting
per example), the attention implementation, Liger's kernels and the dtype of the unquantized
parameters and of the residual stream. Per setting it reports real (non-pad) tokens/s over the
steps after warm-up, MFU, peak GPU memory and the mean loss of the first K steps, which must
agree with the eager, unpacked `baseline`: speed must never change the math.

The one exception is the `prototype` setting, which runs the prototype's way as it was: one
example per micro-batch and an optimizer step after each (batch size 1, no accumulation). It
takes more optimizer steps, so its loss is not compared, and it is timed on the first examples
of the same order in groups of at most PROTOTYPE_EXAMPLES_PER_STEP: at ~1 s per example, its
pace is steady within a few examples, and 4 x 64 of them would take most of the time budget.

The loss of a step is the token mean over all of its examples whatever the micro-batching
(the Trainer passes `num_items_in_batch` to the model's loss), so the per-step losses of the
settings are comparable one to one.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from hydra import compose, initialize_config_dir
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    set_seed,
)
from transformers.integrations.liger import apply_liger_kernel

from qlora_exp.data import IGNORE_INDEX, DataModule
from qlora_exp.errors import ConfigError, QloraError
from qlora_exp.model import (
    attach_lora,
    check_liger,
    load_tokenizer,
    load_trainable_base,
    resolve_compute_dtype,
    set_unquantized_precision,
)
from qlora_exp.schema import DataConfig, LoraConfig, ModelConfig, TrainerConfig, register_configs, to_schema
from qlora_exp.synthetic_data import generate_synthetic_examples
from qlora_exp.training import build_training_arguments, peak_memory

log = logging.getLogger("qlora_exp.bench")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# Bench model name -> (conf/model preset whose switches are "the project's defaults", checkpoint).
BENCH_MODELS = {
    "gemma2_9b": ("gemma2_9b_it", "embedded:gemma2-9b"),
    "tiny": ("tiny", "embedded:tiny-gemma2"),
}
LAYOUTS = ("pad_to_max", "dynamic_padding", "padding_free")
PROTOTYPE_MAX_LENGTH = 512  # the prototype's data.max_length: its rows were padded to this
PROTOTYPE_EXAMPLES_PER_STEP = 16  # the prototype's timing group (module docstring)
# Dense bf16 peak of an H100/H200 SXM by NVIDIA's datasheet; KINDS.md measured ~790 on this H200.
DEFAULT_PEAK_TFLOPS = 989.0
FLOP_FORMULA = (
    "MFU = real tokens/s x 4 N / peak; N = all parameters of the base model (the tied LM head counted "
    "once); 4 N = forward 2 N + backward input-gradients 2 N (frozen base: no weight gradients). "
    "Not counted: LoRA's own matmuls, attention scores, the gradient-checkpointing recompute (+2 N)."
)


class BenchError(QloraError):
    """At least one setting failed; the others' results are written all the same."""


@dataclass(frozen=True)
class Setting:
    """How one optimizer step's examples are laid out and computed."""

    name: str
    layout: str  # one of LAYOUTS
    micro_batch: int  # examples per micro-batch
    attn_implementation: str
    use_liger_kernel: bool
    upcast_unquantized_params: bool = True
    fp32_residual: bool = False
    optim: str | None = None  # None: --optim
    examples_per_step: int | None = None  # None: --examples-per-step
    # The prototype's way: an optimizer step after every micro-batch instead of accumulating the
    # step's examples. Its losses are then those of other optimizer steps and are not compared.
    step_every_micro_batch: bool = False
    description: str = ""

    def steps_of(self, examples_per_step: int) -> int:
        """Examples per bench step for this setting: its own, or the run's."""
        return self.examples_per_step or examples_per_step

    def validate(self, examples_per_step: int) -> None:
        """Refuse settings that cannot run the common steps, naming the fix."""
        examples_per_step = self.steps_of(examples_per_step)
        if self.layout not in LAYOUTS:
            raise ConfigError(
                f"setting {self.name}: layout {self.layout!r}. Fix: use one of {', '.join(LAYOUTS)}"
            )
        if self.micro_batch < 1 or examples_per_step % self.micro_batch:
            raise ConfigError(
                f"setting {self.name}: micro_batch={self.micro_batch} does not divide "
                f"--examples-per-step={examples_per_step}. "
                "Fix: pick a divisor so every setting takes the same steps"
            )


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


class StepRecorder(TrainerCallback):
    """Seconds of each optimizer step (device-synchronised) and each step's logged loss.

    A step lasts from the end of the previous one (data loading included) to its own end. When
    `profile_step` is set, that step runs under torch.profiler and its table is written afterwards;
    the caller leaves that step out of the timing, and the table's writing is timed by no step.
    """

    def __init__(self, profile_step: int | None = None, profile_path: Path | None = None) -> None:
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self.profile_step = profile_step
        self.profile_path = profile_path
        self._profiler: torch.profiler.profile | None = None
        self._last = 0.0

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last = self._now()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.profile_step and self._profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = self._now()
        self.seconds.append(now - self._last)
        if self._profiler is not None and self.profile_path is not None:
            self._profiler.stop()
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            table = self._profiler.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70)
            self.profile_path.write_text(table, encoding="utf-8")
            log.info("profile of step %d written to %s", state.global_step, self.profile_path)
            self._profiler = None
            now = self._now()
        self._last = now

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


# ---------------------------------------------------------------- settings


def standard_settings(
    model_cfg: ModelConfig, examples_per_step: int, max_length: int = PROTOTYPE_MAX_LENGTH
) -> list[Setting]:
    """The prototype's way, a plain-transformers baseline, and the project's defaults for the model."""
    return [
        Setting(
            name="prototype",
            layout="pad_to_max",
            micro_batch=1,
            attn_implementation="eager",
            use_liger_kernel=False,
            step_every_micro_batch=True,
            examples_per_step=min(PROTOTYPE_EXAMPLES_PER_STEP, examples_per_step),
            description=f"one example per micro-batch padded to {max_length}, eager attention, "
            "an optimizer step after each",
        ),
        Setting(
            name="baseline",
            layout="dynamic_padding",
            micro_batch=min(8, examples_per_step),
            attn_implementation="eager",
            use_liger_kernel=False,
            description="plain transformers: micro-batch 8 padded to its longest row, eager attention",
        ),
        Setting(
            name="defaults",
            layout="padding_free",
            micro_batch=examples_per_step,
            attn_implementation=model_cfg.attn_implementation,
            use_liger_kernel=model_cfg.use_liger_kernel,
            upcast_unquantized_params=model_cfg.upcast_unquantized_params,
            fp32_residual=model_cfg.fp32_residual,
            description="the model preset's switches; one micro-batch per step, flattened without padding",
        ),
    ]


def parse_setting(spec: str, base: Setting) -> Setting:
    """`NAME:key=value,...` as a variant of `base`; keys as in the error message below."""
    name, _, body = spec.partition(":")
    if not name or not body:
        raise ConfigError(f"--extra {spec!r}: expected NAME:key=value,... Fix: e.g. eager_pf:attn=eager")
    changes: dict[str, Any] = {"name": name, "description": f"defaults with {body}"}
    for item in body.split(","):
        key, _, value = item.partition("=")
        if key == "layout":
            changes["layout"] = value
        elif key == "micro_batch" and value.isdigit():
            changes["micro_batch"] = int(value)
        elif key == "attn":
            changes["attn_implementation"] = value
        elif key == "liger" and value in ("0", "1"):
            changes["use_liger_kernel"] = value == "1"
        elif key == "upcast" and value in ("0", "1"):
            changes["upcast_unquantized_params"] = value == "1"
        elif key == "fp32_residual" and value in ("0", "1"):
            changes["fp32_residual"] = value == "1"
        elif key == "optim" and value:
            changes["optim"] = value
        else:
            raise ConfigError(
                f"--extra {spec!r}: cannot read {item!r}. "
                "Fix: keys are layout=, micro_batch=N, attn=, liger=0|1, upcast=0|1, fp32_residual=0|1, "
                "optim=NAME"
            )
    return replace(base, **changes)


def order_settings(settings: list[Setting]) -> list[Setting]:
    """Settings without Liger first: Liger patches the shared model in place and cannot be undone."""
    ordered = [s for s in settings if not s.use_liger_kernel] + [s for s in settings if s.use_liger_kernel]
    if ordered != settings:
        log.info("running settings without Liger first: %s", ", ".join(s.name for s in ordered))
    return ordered


def long_form_rows(
    count: int, *, seed: int, median_tokens: float, sigma: float, tokenizer: Any, max_length: int
) -> list[dict]:
    """Alpaca-style rows whose token lengths follow a log-normal (median, sigma), capped below max_length.

    The built-in examples are short (tens of tokens); real instruction data is not. Each row joins
    built-in examples until its instruction + answer reach a length drawn from the distribution, so
    the bench sees realistic lengths through the project's own template, tokenizer and masking.
    """
    rng = random.Random(seed)
    pool = generate_synthetic_examples(max(200, count), seed=seed, zh_fraction=0.3)
    rows = []
    for _ in range(count):
        target = min(max_length - 32, max(24, round(rng.lognormvariate(math.log(median_tokens), sigma))))
        instruction, output, tokens = [], [], 0
        while tokens < target:
            example = rng.choice(pool)
            instruction.append(f"{example['instruction']} {example['input']}".strip())
            output.append(example["output"])
            tokens = len(tokenizer(" ".join(instruction) + " " + " ".join(output))["input_ids"])
        rows.append({"instruction": "\n".join(instruction), "input": "", "output": "\n".join(output)})
    return rows


def bench_dataset(
    data: str, tokenizer: PreTrainedTokenizerBase, count: int, *, seed: int, out_dir: Path, max_length: int
) -> tuple[Dataset, dict[str, Any]]:
    """`count` tokenized training examples through the project's DataModule, plus their stats."""
    if data == "builtin":
        cfg = DataConfig(source="synthetic", synthetic_size=max(2 * count, 64), max_length=max_length)
    else:
        if data == "long":
            path = out_dir / "bench_data.jsonl"
            rows = long_form_rows(
                2 * count,
                seed=seed,
                median_tokens=190.0,
                sigma=0.55,
                tokenizer=tokenizer,
                max_length=max_length,
            )
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        else:
            path = Path(data)
        cfg = DataConfig(source="local", path=str(path), max_length=max_length)
    module = DataModule(cfg, tokenizer, seed)
    module.setup()
    train = module.train_dataset
    assert train is not None
    if len(train) < count:
        raise ConfigError(
            f"--data {data}: {len(train)} usable training rows, the bench needs {count}. "
            "Fix: give more rows or lower --examples-per-step / --steps"
        )
    subset = train.select(range(count))
    lengths = [len(ids) for ids in subset["input_ids"]]
    stats = {
        "source": data,
        "examples": count,
        "real_tokens": sum(lengths),
        "mean_length": sum(lengths) / count,
        "longest": max(lengths),
        "label_tokens": sum(sum(1 for t in labels if t != IGNORE_INDEX) for labels in subset["labels"]),
    }
    return subset, stats


def build_collator(setting: Setting, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Any:
    """The transformers collator for the layout (padding-free as `data.packing=padding_free` does)."""
    if setting.layout == "padding_free":
        # One row per micro-batch, position_ids restarting per example; the attention masks
        # derive each example's boundaries from the position ids, and labels get -100 at each seam.
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    padding: str = "max_length" if setting.layout == "pad_to_max" else "longest"
    return DataCollatorForSeq2Seq(
        tokenizer,
        padding=padding,
        max_length=max_length if padding == "max_length" else None,
        label_pad_token_id=IGNORE_INDEX,
        return_tensors="pt",
    )


# ---------------------------------------------------------------- measurement


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


def run_setting(
    setting: Setting,
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    lora_cfg: LoraConfig,
    args: argparse.Namespace,
    out_dir: Path,
) -> SettingResult:
    """Fresh LoRA on the shared base, train `steps` optimizer steps, measure; the base is left LoRA-free."""
    result = SettingResult(setting=setting)
    compiled = setting.attn_implementation == "flex_attention"
    # Compiled attention compiles for the first shape, then once more for dynamic shapes.
    result.warmup_steps = args.warmup_steps + (1 if compiled else 0)
    timed_steps = max(args.loss_steps, result.warmup_steps + args.timed_steps)
    profile = args.profile == setting.name
    # A profiled step runs slower; it is one extra step at the end, outside the timing.
    result.steps = timed_steps + (1 if profile else 0)
    per_bench_step = setting.steps_of(args.examples_per_step)
    micro_batches = per_bench_step // setting.micro_batch
    # Optimizer steps per bench step: 1, or one per micro-batch for the prototype's way.
    per_step = micro_batches if setting.step_every_micro_batch else 1
    examples = dataset.select(range(result.steps * per_bench_step))
    lengths = [len(ids) for ids in examples["input_ids"]]
    result.step_real_tokens = [
        sum(lengths[i * per_bench_step : (i + 1) * per_bench_step]) for i in range(result.steps)
    ]
    base.set_attn_implementation(setting.attn_implementation)
    # Unquantized params in fp32 (peft's default) or the compute dtype; the cast is lossless both ways
    # because the checkpoint holds them in the compute dtype. The hooks go when the setting ends.
    hooks = set_unquantized_precision(
        base,
        upcast=setting.upcast_unquantized_params,
        fp32_residual=setting.fp32_residual,
        compute_dtype=resolve_compute_dtype(args.compute_dtype),
    )
    if setting.use_liger_kernel:
        apply_liger_kernel(base, None)
    result.accumulation = micro_batches // per_step
    set_seed(args.seed)  # the same LoRA initialisation for every setting
    model = attach_lora(base, lora_cfg)
    trainer_cfg = TrainerConfig(
        max_steps=result.steps * per_step,
        per_device_train_batch_size=setting.micro_batch,
        gradient_accumulation_steps=result.accumulation,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim=setting.optim or args.optim,
        logging_steps=1,
        train_sampling_strategy="sequential",
    )
    recorder = StepRecorder(
        profile_step=timed_steps * per_step if profile else None,
        profile_path=out_dir / f"profile_{setting.name}.txt" if profile else None,
    )
    training_args = build_training_arguments(trainer_cfg, out_dir / "trainer" / setting.name, args.seed)
    training_args.eval_on_start = False  # training measures its "before" loss; the bench has no eval set
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=examples,
        data_collator=build_collator(setting, tokenizer, args.max_length),
        processing_class=tokenizer,
        callbacks=[recorder],
    )
    trainer.remove_callback(PrinterCallback)  # the table and the log say it; no dict per step on stdout
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    log.info(
        "setting %s: %s, %d steps (%d warm-up)",
        setting.name,
        setting.description,
        result.steps,
        result.warmup_steps,
    )
    try:
        trainer.train()
        result.step_seconds = group_sums(recorder.seconds, per_step)
        result.step_losses = [loss / per_step for loss in group_sums(recorder.losses, per_step)]
        timed = slice(result.warmup_steps, timed_steps)
        seconds = sum(result.step_seconds[timed])
        result.real_tokens_per_s = sum(result.step_real_tokens[timed]) / seconds if seconds > 0 else None
        if result.real_tokens_per_s is not None and torch.cuda.is_available():
            flops = count_flops_per_token(base) * result.real_tokens_per_s
            result.mfu = flops / (args.peak_tflops * 1e12)
        k = args.loss_steps
        comparable = not setting.step_every_micro_batch and len(result.step_losses) >= k
        result.mean_loss_first_k = sum(result.step_losses[:k]) / k if comparable else None
        memory = peak_memory()
        result.peak_memory_gb, result.peak_memory_kind = memory["peak_memory_gb"], memory["peak_memory_kind"]
    except torch.OutOfMemoryError as exc:
        result.error = f"out of memory: {str(exc).splitlines()[0]}"
        log.error("setting %s: %s", setting.name, result.error)
    except Exception as exc:  # reported in the table and the exit code; the next setting runs
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.exception("setting %s failed", setting.name)
    finally:
        for hook in hooks:
            hook.remove()
        trainer.model_wrapped = trainer.model = None  # type: ignore[assignment]
        del trainer
        model.unload()  # removes the LoRA layers; the base stays loaded for the next setting
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------- report


def versions() -> dict[str, str]:
    """Versions of what the numbers depend on."""
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "liger-kernel", "triton"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def pick(
    results: list[SettingResult], name: str, usable: Callable[[SettingResult], bool]
) -> SettingResult | None:
    """The setting called `name` if it ran usably, else the first usable one."""
    named = [r for r in results if r.setting.name == name and usable(r)]
    return next(iter(named or [r for r in results if usable(r)]), None)


def markdown_table(results: list[SettingResult], loss_steps: int) -> str:
    """One row per setting; speed against `prototype`, loss against `baseline` (eager, unpacked)."""
    speed_ref = pick(results, "prototype", lambda r: bool(r.real_tokens_per_s))
    loss_ref = pick(results, "baseline", lambda r: bool(r.mean_loss_first_k))
    header = (
        "| setting | layout | micro-batch x accumulation | attention | Liger | unquantized params "
        f"| optimizer | real tokens/s | x {speed_ref.setting.name if speed_ref else 'n/a'} "
        f"| MFU | peak GPU memory (GiB) | mean loss, first {loss_steps} steps "
        f"| loss vs {loss_ref.setting.name if loss_ref else 'n/a'} |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        s = r.setting
        accumulation = f"{s.micro_batch} x {r.accumulation}" + (
            " (a step each)" if s.step_every_micro_batch else ""
        )
        lead = (
            f"| {s.name} | {s.layout} | {accumulation} | {s.attn_implementation} | "
            f"{_on(s.use_liger_kernel)} | {_precision(s)} | {s.optim} | "
        )
        if r.error:
            rows.append(f"{lead}{r.error} | | | | | |")
            continue
        speedup = (
            f"{r.real_tokens_per_s / speed_ref.real_tokens_per_s:.1f}x"
            if r.real_tokens_per_s and speed_ref and speed_ref.real_tokens_per_s
            else "n/a"
        )
        loss_delta = (
            f"{100 * (r.mean_loss_first_k / loss_ref.mean_loss_first_k - 1):+.2f}%"
            if r.mean_loss_first_k is not None and loss_ref and loss_ref.mean_loss_first_k
            else "n/a"
        )
        rows.append(
            f"{lead}{_fmt(r.real_tokens_per_s, '.0f')} | {speedup} | "
            f"{_fmt(r.mfu and 100 * r.mfu, '.1f')}{'%' if r.mfu else ''} | {_fmt(r.peak_memory_gb, '.1f')} | "
            f"{_fmt(r.mean_loss_first_k, '.4f')} | {loss_delta} |"
        )
    return header + "\n".join(rows) + "\n"


def _precision(setting: Setting) -> str:
    if setting.upcast_unquantized_params:
        return "fp32"
    return "compute dtype, fp32 residual" if setting.fp32_residual else "compute dtype"


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def write_report(
    results: list[SettingResult], meta: dict[str, Any], out_dir: Path, loss_steps: int
) -> tuple[Path, Path]:
    """bench.json (everything) and bench.md (the table plus how it was made)."""
    json_path, md_path = out_dir / "bench.json", out_dir / "bench.md"
    payload = {"meta": meta, "settings": [r.to_dict() for r in results]}
    json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    table = markdown_table(results, loss_steps)
    # Settings timed on their own groups of the first examples (the prototype's way), as they ran.
    own_groups = "".join(
        f"; {r.setting.name} is timed on the first ones, in groups of {r.setting.examples_per_step}"
        for r in results
        if r.setting.examples_per_step and r.setting.examples_per_step != meta["examples_per_step"]
    )
    lines = [
        f"# qlora-bench: {meta['model']} on {meta['device']}",
        "",
        table,
        f"- command: `{meta['command']}`",
        f"- data: {meta['data']['examples']} examples, mean {meta['data']['mean_length']:.0f} tokens "
        f"({meta['data']['source']}); {meta['examples_per_step']} examples per optimizer step, "
        f"identical order in every setting{own_groups}",
        f"- real tokens/s: non-pad tokens over the steps after warm-up; {FLOP_FORMULA} Peak "
        f"{meta['peak_tflops']:.0f} TFLOP/s.",
        "- peak GPU memory: torch.cuda.max_memory_allocated, reset before each setting "
        "(base weights included)",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        "",
    ]
    md_path.write_text("\n".join(lines), encoding="utf-8")
    return json_path, md_path


# ---------------------------------------------------------------- entry point


def compose_model_section(preset: str, name_or_path: str) -> tuple[ModelConfig, LoraConfig]:
    """The model preset and LoRA defaults exactly as `qlora-train model=PRESET` composes them."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"model={preset}", f"model.name_or_path={name_or_path}", "tracking=none"],
        )
    schema = to_schema(cfg)
    return schema.model, schema.lora


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; defaults fit one H200 within one 10-minute command."""
    parser = argparse.ArgumentParser(prog="qlora-bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        choices=sorted(BENCH_MODELS),
        default=None,
        help="gemma2_9b (default with a GPU) or tiny (default without)",
    )
    parser.add_argument(
        "--data",
        default="long",
        help="long (built-in examples joined to realistic lengths, default), builtin, or a "
        "path to an alpaca .json/.jsonl file",
    )
    parser.add_argument(
        "--settings",
        default="prototype,baseline,defaults",
        help="comma-separated standard settings to run, in order",
    )
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        help="another setting as a variant of defaults: NAME:key=value,... "
        "(layout=, micro_batch=N, attn=, liger=0|1, upcast=0|1, fp32_residual=0|1, optim=NAME"
        "); may repeat",
    )
    parser.add_argument(
        "--examples-per-step",
        type=int,
        default=None,
        help="examples per optimizer step, the same in every setting but the prototype's "
        "(default 64 GPU, 8 CPU)",
    )
    parser.add_argument("--loss-steps", type=int, default=3, help="K: steps whose mean loss is compared")
    parser.add_argument(
        "--warmup-steps", type=int, default=1, help="untimed steps (+1 for compiled attention)"
    )
    parser.add_argument("--timed-steps", type=int, default=3, help="steps timed after warm-up")
    parser.add_argument(
        "--max-length",
        type=int,
        default=PROTOTYPE_MAX_LENGTH,
        help="longest example kept (as data.max_length) and the prototype's padded length",
    )
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument(
        "--optim", default=None, help="default paged_adamw_8bit on a GPU, adamw_torch on the CPU"
    )
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS, help="MFU denominator")
    parser.add_argument(
        "--profile",
        default=None,
        help="setting name: profile one extra step after its timed ones (profile_NAME.txt)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default outputs/bench/<time>)"
    )
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    args.model = args.model or ("gemma2_9b" if gpu else "tiny")
    args.examples_per_step = args.examples_per_step or (64 if gpu else 8)
    args.optim = args.optim or ("paged_adamw_8bit" if gpu else "adamw_torch")
    for key in ("loss_steps", "timed_steps", "examples_per_step"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1. Fix: pass a positive number")
    if args.max_length < 64:
        raise ConfigError(
            f"--max-length {args.max_length} is too short. Fix: use 64 or more (512 as the prototype)"
        )
    if args.warmup_steps < 0:
        raise ConfigError("--warmup-steps must be >= 0. Fix: pass 0 or more")
    return args


def select_settings(args: argparse.Namespace, model_cfg: ModelConfig) -> list[Setting]:
    """Standard settings by name plus --extra variants, validated, Liger-free ones first."""
    standard = {s.name: s for s in standard_settings(model_cfg, args.examples_per_step, args.max_length)}
    settings = []
    for name in filter(None, args.settings.split(",")):
        if name not in standard:
            raise ConfigError(f"--settings: unknown {name!r}. Fix: choose from {', '.join(standard)}")
        settings.append(standard[name])
    settings += [parse_setting(spec, standard["defaults"]) for spec in args.extra]
    settings = [replace(s, optim=s.optim or args.optim) for s in settings]
    if not settings:
        raise ConfigError("no settings to run. Fix: pass --settings and/or --extra")
    for s in settings:
        s.validate(args.examples_per_step)
        check_liger(replace(model_cfg, use_liger_kernel=s.use_liger_kernel))
    if len({s.name for s in settings}) != len(settings):
        raise ConfigError("setting names repeat. Fix: give each --extra its own NAME")
    return order_settings(settings)


def run_bench(args: argparse.Namespace, command: str) -> list[SettingResult]:
    """Load once, run every setting, write bench.json and bench.md; returns the results."""
    preset, name_or_path = BENCH_MODELS[args.model]
    model_cfg, lora_cfg = compose_model_section(preset, name_or_path)
    settings = select_settings(args, model_cfg)
    out_dir = args.out or Path("outputs/bench") / datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model_cfg)
    warmup_max = args.warmup_steps + 1
    steps_max = max(args.loss_steps, warmup_max + args.timed_steps) + (1 if args.profile else 0)
    dataset, data_stats = bench_dataset(
        args.data,
        tokenizer,
        steps_max * args.examples_per_step,
        seed=args.seed,
        out_dir=out_dir,
        max_length=args.max_length,
    )
    started = time.perf_counter()
    # Loaded once with no Liger, no precision hooks and the first setting's attention; each setting
    # switches what it needs.
    base = load_trainable_base(
        replace(
            model_cfg,
            use_liger_kernel=False,
            fp32_residual=False,
            attn_implementation=settings[0].attn_implementation,
        )
    )
    log.info("model loaded in %.0f s", time.perf_counter() - started)
    args.compute_dtype = model_cfg.bnb_4bit_compute_dtype
    meta = {
        "model": f"{args.model} ({name_or_path}, preset model={preset})",
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.processor()})",
        "command": command,
        "data": data_stats,
        "examples_per_step": args.examples_per_step,
        "loss_steps": args.loss_steps,
        "flop_formula": FLOP_FORMULA,
        "flops_per_token": count_flops_per_token(base),
        "peak_tflops": args.peak_tflops,
        "lora": asdict(lora_cfg),
        "versions": versions(),
    }
    results: list[SettingResult] = []
    for setting in settings:
        results.append(
            run_setting(setting, base, tokenizer, dataset, lora_cfg=lora_cfg, args=args, out_dir=out_dir)
        )
        log.info("setting %s done: %s", setting.name, results[-1].real_tokens_per_s)
        # Written after every setting, so a run stopped part-way keeps what it measured.
        meta["wall_seconds"] = time.perf_counter() - started
        json_path, md_path = write_report(results, meta, out_dir, args.loss_steps)
    print(markdown_table(results, args.loss_steps))
    log.info("wrote %s and %s", json_path, md_path)
    failed = [r.setting.name for r in results if r.error]
    if failed:
        raise BenchError(f"settings failed: {', '.join(failed)} (reasons in the table and the log above)")
    return results


def main(argv: list[str] | None = None) -> None:
    """Console entry point (`qlora-bench`, `python -m qlora_exp.bench`, `make bench`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = parse_args(argv)
        run_bench(args, " ".join(["qlora-bench", *(argv if argv is not None else sys.argv[1:])]))
    except QloraError as exc:
        log.error("%s", exc)
        raise SystemExit(exc.exit_code) from exc


if __name__ == "__main__":
    main()
