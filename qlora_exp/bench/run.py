"""The bench from command line to report: load the model once, run every setting, write as it goes."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from qlora_exp.bench.data import run_dataset
from qlora_exp.bench.measure import (
    FLOP_FORMULA,
    SettingResult,
    Shared,
    count_flops_per_token,
    load_shared_base,
    run_setting,
)
from qlora_exp.bench.options import BENCH_MODELS, BenchOptions
from qlora_exp.bench.report import markdown_table, versions, write_report
from qlora_exp.bench.settings import select_settings
from qlora_exp.errors import QloraError
from qlora_exp.model import load_tokenizer
from qlora_exp.schema import CONF_DIR, LoraConfig, ModelConfig, register_configs, to_schema

log = logging.getLogger(__name__)


class BenchError(QloraError):
    """At least one setting failed; the others' results are written all the same."""


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


def output_dir(options: BenchOptions) -> Path:
    """--out, or a new outputs/bench/<UTC time> directory."""
    out_dir = options.out or Path("outputs/bench") / datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def bench_meta(
    options: BenchOptions, command: str, base: torch.nn.Module, lora_cfg: LoraConfig, data_stats: dict
) -> dict[str, Any]:
    """bench.json's `meta`: what ran, on what, with which data and versions."""
    preset, name_or_path = BENCH_MODELS[options.model]
    return {
        "model": f"{options.model} ({name_or_path}, preset model={preset})",
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.processor()})",
        "command": command,
        "data": data_stats,
        "examples_per_step": options.examples_per_step,
        "loss_steps": options.loss_steps,
        "flop_formula": FLOP_FORMULA,
        "flops_per_token": count_flops_per_token(base),
        "peak_tflops": options.peak_tflops,
        "lora": asdict(lora_cfg),
        "versions": versions(),
    }


def run_bench(options: BenchOptions, command: str) -> list[SettingResult]:
    """Load once, run every setting, write bench.json and bench.md; returns the results."""
    preset, name_or_path = BENCH_MODELS[options.model]
    model_cfg, lora_cfg = compose_model_section(preset, name_or_path)
    settings = select_settings(
        options.settings,
        options.extra,
        model_cfg,
        examples_per_step=options.examples_per_step,
        max_length=options.max_length,
        optim=options.optim,
        lora_dropout=lora_cfg.dropout,
    )
    out_dir = output_dir(options)
    tokenizer = load_tokenizer(model_cfg)
    dataset, data_stats = run_dataset(options, tokenizer, out_dir)
    started = time.perf_counter()
    base = load_shared_base(model_cfg, settings[0].attn_implementation)
    log.info("model loaded in %.0f s", time.perf_counter() - started)
    shared = Shared(base, tokenizer, dataset, lora_cfg, model_cfg.bnb_4bit_compute_dtype, options, out_dir)
    meta = bench_meta(options, command, base, lora_cfg, data_stats)
    results: list[SettingResult] = []
    for setting in settings:
        results.append(run_setting(setting, shared))
        log.info("setting %s done: %s", setting.name, results[-1].real_tokens_per_s)
        # Written after every setting, so a run stopped part-way keeps what it measured.
        meta["wall_seconds"] = time.perf_counter() - started
        json_path, md_path = write_report(results, meta, out_dir, options.loss_steps)
    print(markdown_table(results, options.loss_steps))
    log.info("wrote %s and %s", json_path, md_path)
    failed = [r.setting.name for r in results if r.error]
    if failed:
        raise BenchError(f"settings failed: {', '.join(failed)} (reasons in the table and the log above)")
    return results
