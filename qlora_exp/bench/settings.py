"""The named settings the bench times, and what each one changes.

A setting is how one optimizer step's examples are laid out in micro-batches and computed; the
standard ones are the prototype's way, a plain-transformers baseline and the model preset's
defaults, and `--extra NAME:key=value,...` adds variants of the defaults.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from qlora_exp.errors import ConfigError
from qlora_exp.model import check_liger
from qlora_exp.schema import ModelConfig
from qlora_exp.schema.model import flex_block_size_problem, flex_kernel_options_problem

log = logging.getLogger(__name__)

# How a setting lays out its micro-batches: padded to --max-length, padded to the micro-batch's
# longest row, or flattened into one row without padding (as `data.packing=padding_free` trains).
LAYOUTS = ("pad_to_max", "dynamic_padding", "padding_free")
PROTOTYPE_MAX_LENGTH = 512  # the prototype's data.max_length: its rows were padded to this
# The prototype's timing group: at ~1 s per example its pace is steady within a few examples,
# and 4 x 64 of them would take most of a 10-minute command.
PROTOTYPE_EXAMPLES_PER_STEP = 16
EXTRA_KEYS = (
    "layout=, micro_batch=N, attn=, flex_block=N|default, flex_options=NAME=V+...|default, liger=0|1, "
    "upcast=0|1, fp32_residual=0|1, "
    "compile=0|1, uncheckpointed=N, lora_dropout=P, optim=NAME"
)


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
    compile_layers: bool = False
    flex_block_size: int | None = None  # None: torch's default (128)
    flex_kernel_options: dict[str, Any] | None = None  # None: torch's tiles for the GPU
    uncheckpointed_layers: int = 0  # the last N decoder layers not checkpointed
    lora_dropout: float | None = None  # None: the LoRA defaults' (select_settings resolves it)
    optim: str | None = None  # None: --optim
    examples_per_step: int | None = None  # None: --examples-per-step
    # The prototype's way: an optimizer step after every micro-batch instead of accumulating the
    # step's examples. Its losses are then those of other optimizer steps and are not compared.
    step_every_micro_batch: bool = False
    description: str = ""

    @property
    def liger_scope(self) -> int:
        """0: no Liger; 1: only its kernels outside the layers (compiled layers); 2: all of them."""
        if not self.use_liger_kernel:
            return 0
        return 1 if self.compile_layers else 2

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
        if flex_block_size_problem(self.attn_implementation, self.flex_block_size):
            raise ConfigError(
                f"setting {self.name}: flex_block={self.flex_block_size} with "
                f"attn={self.attn_implementation}. "
                "Fix: a multiple of 16 (e.g. 64), with attn=flex_attention only"
            )
        problem = flex_kernel_options_problem(
            self.attn_implementation, self.flex_block_size, self.flex_kernel_options
        )
        if problem:
            raise ConfigError(
                f"setting {self.name}: flex_options {problem}. "
                "Fix: speed options of flex attention's kernels (e.g. flex_options=bwd_num_warps=8), "
                "with attn=flex_attention only"
            )
        if self.micro_batch < 1 or examples_per_step % self.micro_batch:
            raise ConfigError(
                f"setting {self.name}: micro_batch={self.micro_batch} does not divide "
                f"--examples-per-step={examples_per_step}. "
                "Fix: pick a divisor so every setting takes the same steps"
            )


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
            compile_layers=model_cfg.compile_layers,
            flex_block_size=model_cfg.flex_block_size,
            flex_kernel_options=model_cfg.flex_kernel_options,
            uncheckpointed_layers=model_cfg.uncheckpointed_layers,
            description="the model preset's switches; one micro-batch per step, flattened without padding",
        ),
    ]


def parse_setting(spec: str, base: Setting) -> Setting:
    """`NAME:key=value,...` as a variant of `base`; the keys are EXTRA_KEYS."""
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
        elif key == "compile" and value in ("0", "1"):
            changes["compile_layers"] = value == "1"
        elif key == "flex_block" and (value.isdigit() or value == "default"):
            changes["flex_block_size"] = None if value == "default" else int(value)
        elif key == "flex_options" and value:
            changes["flex_kernel_options"] = None if value == "default" else _kernel_options(value)
        elif key == "uncheckpointed" and value.isdigit():
            changes["uncheckpointed_layers"] = int(value)
        elif key == "lora_dropout" and _is_dropout(value):
            changes["lora_dropout"] = float(value)
        elif key == "optim" and value:
            changes["optim"] = value
        else:
            raise ConfigError(f"--extra {spec!r}: cannot read {item!r}. Fix: keys are {EXTRA_KEYS}")
    return replace(base, **changes)


def _is_dropout(value: str) -> bool:
    try:
        return 0.0 <= float(value) < 1.0
    except ValueError:
        return False


def order_settings(settings: list[Setting]) -> list[Setting]:
    """Settings without Liger first, then those with its kernels outside the layers only, then all of
    them: Liger patches the shared model in place and cannot be undone."""
    ordered = sorted(settings, key=lambda s: s.liger_scope)  # stable: the given order within a scope
    if ordered != settings:
        log.info("running settings without Liger first: %s", ", ".join(s.name for s in ordered))
    return ordered


def select_settings(
    names: tuple[str, ...],
    extras: tuple[str, ...],
    model_cfg: ModelConfig,
    *,
    examples_per_step: int,
    max_length: int,
    optim: str,
    lora_dropout: float,
) -> list[Setting]:
    """Standard settings by name plus `extras` variants, validated, Liger-free ones first; each with
    its optimizer and LoRA dropout resolved (`optim`, `lora_dropout` where it names none).

    Everything is checked here, before any model loads, so a typo costs seconds, not a model load.
    """
    standard = {s.name: s for s in standard_settings(model_cfg, examples_per_step, max_length)}
    settings = []
    for name in names:
        if name not in standard:
            raise ConfigError(f"--settings: unknown {name!r}. Fix: choose from {', '.join(standard)}")
        settings.append(standard[name])
    settings += [parse_setting(spec, standard["defaults"]) for spec in extras]
    settings = [
        replace(
            s, optim=s.optim or optim, lora_dropout=lora_dropout if s.lora_dropout is None else s.lora_dropout
        )
        for s in settings
    ]
    if not settings:
        raise ConfigError("no settings to run. Fix: pass --settings and/or --extra")
    for s in settings:
        s.validate(examples_per_step)
        check_liger(replace(model_cfg, use_liger_kernel=s.use_liger_kernel))
    if len({s.name for s in settings}) != len(settings):
        raise ConfigError("setting names repeat. Fix: give each --extra its own NAME")
    return order_settings(settings)


def _kernel_options(value: str) -> dict[str, Any]:
    """`NAME=V+NAME=V` (flex_options=): integers, or true/false; Setting.validate checks the names."""
    options: dict[str, Any] = {}
    for item in value.split("+"):
        name, _, raw = item.partition("=")
        options[name] = {"true": True, "false": False}.get(
            raw.lower(), int(raw) if raw.lstrip("-").isdigit() else raw
        )
    return options
