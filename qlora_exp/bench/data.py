"""The bench's examples: tokenized by the project's own DataModule, so template and masking are training's."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from qlora_exp.bench.options import BenchOptions
from qlora_exp.data.module import IGNORE_INDEX, DataModule
from qlora_exp.data.synthetic import generate_synthetic_examples
from qlora_exp.errors import ConfigError
from qlora_exp.schema import DataConfig

# `--data long`: lengths of real instruction data (tiny-tokenizer tokens), see BENCHMARKS.md.
LONG_MEDIAN_TOKENS = 190.0
LONG_SIGMA = 0.55


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


def data_config(
    data: str, tokenizer: PreTrainedTokenizerBase, count: int, *, seed: int, out_dir: Path, max_length: int
) -> DataConfig:
    """The DataConfig for `--data`; `long` first writes its generated rows to out_dir/bench_data.jsonl."""
    if data == "builtin":
        return DataConfig(source="synthetic", synthetic_size=max(2 * count, 64), max_length=max_length)
    path = Path(data)
    if data == "long":
        path = out_dir / "bench_data.jsonl"
        rows = long_form_rows(
            2 * count,
            seed=seed,
            median_tokens=LONG_MEDIAN_TOKENS,
            sigma=LONG_SIGMA,
            tokenizer=tokenizer,
            max_length=max_length,
        )
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return DataConfig(source="local", path=str(path), max_length=max_length)


def bench_dataset(
    data: str, tokenizer: PreTrainedTokenizerBase, count: int, *, seed: int, out_dir: Path, max_length: int
) -> tuple[Dataset, dict[str, Any]]:
    """`count` tokenized training examples through the project's DataModule, plus their stats."""
    cfg = data_config(data, tokenizer, count, seed=seed, out_dir=out_dir, max_length=max_length)
    module = DataModule(cfg, tokenizer, seed)
    module.setup()
    train = module.train_dataset
    assert train is not None
    if len(train) < count:
        raise ConfigError(
            f"--data {data}: {len(train)} usable training rows, the bench needs {count}. "
            "Fix: give more rows or lower --examples-per-step / --loss-steps / --timed-steps"
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


def run_dataset(
    options: BenchOptions, tokenizer: PreTrainedTokenizerBase, out_dir: Path
) -> tuple[Dataset, dict[str, Any]]:
    """The examples a bench run's settings train on: enough for its longest setting (`bench_dataset`)."""
    return bench_dataset(
        options.data,
        tokenizer,
        options.steps_max * options.examples_per_step,
        seed=options.seed,
        out_dir=out_dir,
        max_length=options.max_length,
    )
