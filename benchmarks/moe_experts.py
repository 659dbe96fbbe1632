"""MoE QLoRA on one GPU: the experts in 4 bits (the project's defaults) against unquantized experts.

qlora-bench loads one base model and times several trainer settings on it; whether the experts are
4-bit is a property of the loaded base, so this script loads the model preset's base once per
variant and times qlora-bench's `defaults` setting on each, on the same examples in the same order
with the same LoRA initialisation (qlora_exp.bench: its data, step recorder and measurement):

- `experts_4bit`: the preset as it is (model.quantize_experts=true);
- `experts_16bit`: model.quantize_experts=false, model.upcast_unquantized_params=false: the fused
  experts stay in the compute dtype, as transformers loads them without this project's quantizer.
  It is the loss reference: the first --loss-steps steps' mean loss of the 4-bit variant is compared
  with it.

Prints one Markdown row per variant (real tokens/s over the timed steps, peak GPU memory, GiB of
weights after loading, mean loss of the first steps and its difference from the reference) and
writes everything to OUT/moe_experts.json, rewritten after each variant.

    python benchmarks/moe_experts.py                # GPU: embedded:qwen3-30b-a3b, model=qwen3_30b_a3b
    python benchmarks/moe_experts.py --examples-per-step 2 --timed-steps 1   # CPU: embedded:tiny-qwen3-moe
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from qlora_exp.bench.data import run_dataset
from qlora_exp.bench.measure import SettingResult, Shared, free_memory, load_shared_base, run_setting
from qlora_exp.bench.options import BenchOptions
from qlora_exp.bench.report import versions
from qlora_exp.bench.run import compose_model_section
from qlora_exp.bench.settings import standard_settings
from qlora_exp.model import load_tokenizer
from qlora_exp.schema import ModelConfig

log = logging.getLogger("moe_experts")

REFERENCE = "experts_16bit"


def parse_args() -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3_30b_a3b", help="conf/model preset (default qwen3_30b_a3b)")
    parser.add_argument(
        "--model",
        default="embedded:qwen3-30b-a3b" if gpu else "embedded:tiny-qwen3-moe",
        help="checkpoint in place of the preset's hub id (default: random weights of its shape on a GPU)",
    )
    parser.add_argument("--data", default="long", help="as qlora-bench --data (default long)")
    parser.add_argument("--examples-per-step", type=int, default=64 if gpu else 8)
    parser.add_argument("--loss-steps", type=int, default=3, help="steps whose mean loss is compared")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--timed-steps", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--optim", default="paged_adamw_8bit" if gpu else "adamw_torch")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--attn",
        default=None,
        help="attention implementation in place of the preset's (model.attn_implementation), both variants",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile one extra step of experts_4bit after its timed ones (OUT/profile_defaults.txt)",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/moe_experts"))
    return parser.parse_args()


def variants(preset: ModelConfig) -> dict[str, ModelConfig]:
    """The preset's model section, and the same with unquantized experts (the loss reference)."""
    if not torch.cuda.is_available() and preset.use_liger_kernel:
        log.warning("no GPU: Liger's kernels off (model.use_liger_kernel=false) for this CPU run")
        preset = replace(preset, use_liger_kernel=False)
    return {
        "experts_4bit": preset,
        REFERENCE: replace(preset, quantize_experts=False, upcast_unquantized_params=False),
    }


def row(name: str, result: SettingResult, weights_gib: float, reference: float | None) -> str:
    """One Markdown table row."""
    loss = result.mean_loss_first_k
    versus = f"{100 * (loss / reference - 1):+.2f}%" if loss is not None and reference else "n/a"
    cells = [
        name,
        f"{result.real_tokens_per_s:,.0f}" if result.real_tokens_per_s else "failed",
        f"{result.peak_memory_gb:.1f}" if result.peak_memory_gb is not None else "n/a",
        f"{weights_gib:.1f}",
        f"{loss:.4f}" if loss is not None else "n/a",
        versus,
        result.error or "",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    preset, lora_cfg = compose_model_section(args.preset, args.model)
    if args.attn:
        preset = replace(preset, attn_implementation=args.attn)
    options = BenchOptions(
        model=args.preset,
        data=args.data,
        settings=("defaults",),
        extra=(),
        examples_per_step=args.examples_per_step,
        loss_steps=args.loss_steps,
        warmup_steps=args.warmup_steps,
        timed_steps=args.timed_steps,
        max_length=args.max_length,
        learning_rate=args.learning_rate,
        optim=args.optim,
        peak_tflops=0.0,  # no MFU: the bench's formula counts every parameter, a MoE activates few
        profile="defaults" if args.profile else None,  # the 4-bit variant's only (below)
        seed=args.seed,
        out=args.out,
    )
    tokenizer = load_tokenizer(preset)
    dataset, data_stats = run_dataset(options, tokenizer, args.out)
    report: dict[str, Any] = {
        "meta": {**vars(args), "out": str(args.out), "data": data_stats},
        "variants": {},
    }
    report["meta"]["versions"] = versions()
    report["meta"]["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    rows = {}
    # The reference first: the 4-bit row's loss is compared with it.
    for name, model_cfg in sorted(variants(preset).items(), key=lambda item: item[0] != REFERENCE):
        setting = replace(
            standard_settings(model_cfg, args.examples_per_step, args.max_length)[-1], optim=args.optim
        )
        started = time.perf_counter()
        base = load_shared_base(model_cfg, setting.attn_implementation)
        load_seconds = time.perf_counter() - started
        weights_gib = (
            torch.cuda.memory_allocated() / 2**30
            if torch.cuda.is_available()
            else sum(p.numel() * p.element_size() for p in base.parameters()) / 2**30
        )
        variant_options = replace(options, profile=None) if name == REFERENCE else options
        shared = Shared(
            base, tokenizer, dataset, lora_cfg, model_cfg.bnb_4bit_compute_dtype, variant_options, args.out
        )
        result = run_setting(setting, shared)
        del base, shared
        free_memory()
        reference = report["variants"].get(REFERENCE, {}).get("mean_loss_first_k")
        rows[name] = row(name, result, weights_gib, reference if name != REFERENCE else None)
        report["variants"][name] = {
            **result.to_dict(),
            "model": asdict(model_cfg),
            "weights_gib": weights_gib,
            "load_seconds": load_seconds,
        }
        (args.out / "moe_experts.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        log.info("%s: %s", name, rows[name])
    header = (
        "| variant | real tokens/s | peak GPU memory (GiB) | weights after loading (GiB) | "
        f"mean loss, first {args.loss_steps} steps | loss vs {REFERENCE} | error |"
    )
    print("\n".join([header, "|---|---|---|---|---|---|---|", rows["experts_4bit"], rows[REFERENCE]]))


if __name__ == "__main__":
    main()
