"""The bench's output: bench.json (everything measured) and bench.md / stdout (one table row per setting)."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from qlora_exp.bench.measure import FLOP_FORMULA, SettingResult
from qlora_exp.bench.settings import Setting
from qlora_exp.run.directory import package_versions

# What the bench's numbers depend on beyond what every run directory records (run_dir.TRACKED_PACKAGES).
BENCH_PACKAGES = ("liger-kernel", "triton")


def versions() -> dict[str, str]:
    """Versions of what the numbers depend on: the run directory's packages plus the bench's kernels."""
    found = dict(package_versions())
    for name in BENCH_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return {"python": platform.python_version(), **{k: v or "absent" for k, v in found.items()}}


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
        "| setting | layout | micro-batch x accumulation | attention | Liger | decoder layers "
        "| unquantized params | optimizer | LoRA dropout "
        f"| real tokens/s | x {speed_ref.setting.name if speed_ref else 'n/a'} "
        f"| MFU | peak GPU memory (GiB) | mean loss, first {loss_steps} steps "
        f"| loss vs {loss_ref.setting.name if loss_ref else 'n/a'} |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    return header + "\n".join(table_row(r, speed_ref, loss_ref) for r in results) + "\n"


def _attention(s: Setting) -> str:
    """The attention, with flex attention's block size and kernel options where the setting sets them."""
    if s.attn_implementation != "flex_attention":
        return s.attn_implementation
    parts = ["flex_attention"]
    if s.flex_block_size is not None:
        parts.append(f"{s.flex_block_size}-blocks")
    parts += [f"{name}={value}" for name, value in (s.flex_kernel_options or {}).items()]
    return ", ".join(parts)


def _layers(s: Setting) -> str:
    """How the decoder layers run: compiled or eager, and how many keep their activations."""
    kept = f", last {s.uncheckpointed_layers} not checkpointed" if s.uncheckpointed_layers else ""
    return ("compiled" if s.compile_layers else "eager") + kept


def table_row(r: SettingResult, speed_ref: SettingResult | None, loss_ref: SettingResult | None) -> str:
    """One setting's row: what it is, then what it measured (or its error) against the references."""
    s = r.setting
    accumulation = f"{s.micro_batch} x {r.accumulation}" + (
        " (a step each)" if s.step_every_micro_batch else ""
    )
    lead = (
        f"| {s.name} | {s.layout} | {accumulation} | {_attention(s)} | "
        f"{_on(s.use_liger_kernel)} | {_layers(s)} | {_precision(s)} | "
        f"{s.optim} | {_fmt(s.lora_dropout, 'g')} | "
    )
    if r.error:
        return f"{lead}{r.error} | | | | | |"
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
    return (
        f"{lead}{_fmt(r.real_tokens_per_s, '.0f')} | {speedup} | "
        f"{_fmt(r.mfu and 100 * r.mfu, '.1f')}{'%' if r.mfu else ''} | {_fmt(r.peak_memory_gb, '.1f')} | "
        f"{_fmt(r.mean_loss_first_k, '.4f')} | {loss_delta} |"
    )


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
