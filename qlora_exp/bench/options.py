"""The bench's command line, read once into a frozen `BenchOptions`.

Defaults that depend on the machine (model, examples per step, optimizer) are resolved here, so the
rest of the bench reads one immutable value instead of an argparse namespace patched as it goes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_exp.bench.settings import EXTRA_KEYS, PROTOTYPE_MAX_LENGTH
from qlora_exp.errors import ConfigError

# Bench model name -> (conf/model preset whose switches are "the project's defaults", checkpoint).
BENCH_MODELS = {
    "gemma2_9b": ("gemma2_9b_it", "embedded:gemma2-9b"),
    "gemma3_4b": ("gemma3_4b_it", "embedded:gemma3-4b"),
    "gemma4_e4b": ("gemma4_e4b_it", "embedded:gemma4-e4b"),
    "qwen3_8b": ("qwen3_8b", "embedded:qwen3-8b"),
    "tiny": ("tiny", "embedded:tiny-gemma2"),
}
# Dense bf16 peak of an H100/H200 SXM by NVIDIA's datasheet; KINDS.md measured ~790 on this H200.
DEFAULT_PEAK_TFLOPS = 989.0
DESCRIPTION = "qlora-bench: one model through several trainer settings, in one process, on identical data."


@dataclass(frozen=True)
class BenchOptions:
    """What one bench run does; every field resolved (no None standing for 'the machine's default')."""

    model: str  # a key of BENCH_MODELS
    data: str  # long, builtin, or a path to an alpaca file
    settings: tuple[str, ...]  # standard settings to run, in order
    extra: tuple[str, ...]  # NAME:key=value,... variants of defaults
    examples_per_step: int
    loss_steps: int  # K: steps whose mean loss is compared
    warmup_steps: int
    timed_steps: int
    max_length: int
    learning_rate: float
    optim: str
    peak_tflops: float
    profile: str | None  # setting to profile one extra step of
    seed: int
    out: Path | None  # None: outputs/bench/<time>

    @property
    def steps_max(self) -> int:
        """Bench steps the longest setting can take: the data must hold this many steps of examples."""
        warmup_max = self.warmup_steps + 1  # +1 for compiled attention
        return max(self.loss_steps, warmup_max + self.timed_steps) + (1 if self.profile else 0)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options; defaults fit one H200 within one 10-minute command."""
    parser = argparse.ArgumentParser(prog="qlora-bench", description=DESCRIPTION)
    parser.add_argument(
        "--model",
        choices=sorted(BENCH_MODELS),
        default=None,
        help="gemma2_9b (default with a GPU), gemma3_4b, gemma4_e4b, qwen3_8b (random-weight checkpoints "
        "of those shapes, with their presets' switches), or tiny (default without a GPU)",
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
        help=f"another setting as a variant of defaults: NAME:key=value,... ({EXTRA_KEYS}); may repeat",
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
        "--optim",
        default=None,
        help="default adamw_torch_fused on a GPU (faster than paged 8-bit AdamW for LoRA's few "
        "parameters, BENCHMARKS.md), adamw_torch on the CPU",
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
    return parser


def parse_options(argv: list[str] | None) -> BenchOptions:
    """The command line as BenchOptions, machine defaults filled in and numbers checked."""
    args = build_parser().parse_args(argv)
    gpu = torch.cuda.is_available()
    options = BenchOptions(
        model=args.model or ("gemma2_9b" if gpu else "tiny"),
        data=args.data,
        settings=tuple(filter(None, args.settings.split(","))),
        extra=tuple(args.extra),
        examples_per_step=args.examples_per_step or (64 if gpu else 8),
        loss_steps=args.loss_steps,
        warmup_steps=args.warmup_steps,
        timed_steps=args.timed_steps,
        max_length=args.max_length,
        learning_rate=args.learning_rate,
        optim=args.optim or ("adamw_torch_fused" if gpu else "adamw_torch"),
        peak_tflops=args.peak_tflops,
        profile=args.profile,
        seed=args.seed,
        out=args.out,
    )
    check_options(options)
    return options


def check_options(options: BenchOptions) -> None:
    """Refuse numbers no run can use, naming the fix, before anything loads."""
    for key in ("loss_steps", "timed_steps", "examples_per_step"):
        if getattr(options, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1. Fix: pass a positive number")
    if options.max_length < 64:
        raise ConfigError(
            f"--max-length {options.max_length} is too short. Fix: use 64 or more (512 as the prototype)"
        )
    if options.warmup_steps < 0:
        raise ConfigError("--warmup-steps must be >= 0. Fix: pass 0 or more")
