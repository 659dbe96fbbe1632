"""`qlora-train dry_run=true`: load and tokenize the data with the model's tokenizer (no weights) and
print what training would see: rendered examples with the trained spans marked, the length
histogram, dropped rows by reason and the steps an epoch would take.

This is the command's table output, so it is printed; the DataModule's own log lines still go to
the log.
"""

from __future__ import annotations

import math

import numpy as np
from transformers import PreTrainedTokenizerBase

from qlora_exp.data.formats import Conversation
from qlora_exp.data.module import DataModule
from qlora_exp.data.packing import steps_per_epoch
from qlora_exp.data.preference import build_data_module
from qlora_exp.data.tokenization import IGNORE_INDEX, Encoded, encode_conversation
from qlora_exp.model import load_tokenizer
from qlora_exp.schema import Config

TRAINED_OPEN, TRAINED_CLOSE = "«", "»"
HISTOGRAM_BINS = 10
BAR_WIDTH = 40


def preview_data(cfg: Config, examples: int = 3) -> float:
    """Print the preview; returns NaN, as there is no objective for a sweeper to read."""
    data = build_data_module(cfg, load_tokenizer(cfg.model))
    data.setup()
    print(render_preview(data, cfg, examples))  # the CLI's output: examples and a length table
    return math.nan


def render_preview(data: DataModule, cfg: Config, examples: int) -> str:
    """The whole preview as text."""
    stats = data.stats.to_dict()
    lines = [
        f"data: {stats['rows_read']} rows read, {stats['rows_sampled']} sampled, format {stats['format']}, "
        f"{stats['train_rows']} train / {stats['val_rows']} validation, {stats['rows_truncated']} truncated",
        f"trained spans are marked {TRAINED_OPEN}like this{TRAINED_CLOSE}",
    ]
    shown = 0
    for conversation in data.train_conversations:
        if shown == examples:
            break
        encoded = _encode(conversation, data)
        if encoded is None:
            continue
        shown += 1
        lines += [
            f"--- example {shown} ({len(encoded.input_ids)} tokens) ---",
            mark_trained(encoded, data.tokenizer),
        ]
    lines += ["--- train length histogram (tokens) ---", *length_histogram(data.stats.lengths)]
    lines.append("--- dropped rows ---")
    if not stats["rows_dropped"]:
        lines.append("none")
    for reason, count in stats["rows_dropped"].items():
        lines.append(f"{reason}: {count}")
        lines += [f"    {example}" for example in stats["rows_dropped_examples"][reason]]
    lines.append(_steps_line(stats, cfg))
    return "\n".join(lines)


def mark_trained(encoded: Encoded, tokenizer: PreTrainedTokenizerBase) -> str:
    """The decoded example with every run of trained tokens between markers."""
    pieces: list[str] = []
    run: list[int] = []
    trained = False
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if (label != IGNORE_INDEX) != trained and run:
            pieces.append(_decode(tokenizer, run, trained))
            run = []
        trained = label != IGNORE_INDEX
        run.append(token)
    if run:
        pieces.append(_decode(tokenizer, run, trained))
    return "".join(pieces)


def length_histogram(lengths: list[int], bins: int = HISTOGRAM_BINS) -> list[str]:
    """Text bars of the token-length distribution."""
    if not lengths:
        return ["(no examples)"]
    counts, edges = np.histogram(lengths, bins=min(bins, len(set(lengths))))
    peak = int(counts.max())
    return [
        f"{int(low):>6}-{int(high):<6} {int(count):>6} {'#' * math.ceil(BAR_WIDTH * count / peak)}"
        for low, high, count in zip(edges[:-1], edges[1:], counts, strict=True)
    ]


def _steps_line(stats: dict, cfg: Config) -> str:
    trainer = cfg.trainer
    per_epoch = steps_per_epoch(
        stats["packing"]["batch_rows"],
        trainer.per_device_train_batch_size,
        trainer.gradient_accumulation_steps,
    )
    unit = "packed rows" if stats["packing"]["mode"] == "packed" else "examples"
    line = (
        f"steps per epoch: {per_epoch} ({stats['packing']['batch_rows']} {unit}, batch "
        f"{trainer.per_device_train_batch_size} x accumulation {trainer.gradient_accumulation_steps}, "
        "one device); "
        f"packing {stats['packing']['mode']}, efficiency {stats['packing']['efficiency']:.3f}"
    )
    if trainer.max_steps > 0:
        return line + f"; trainer.max_steps={trainer.max_steps} stops training there"
    return (
        line
        + f"; {math.ceil(per_epoch * trainer.num_train_epochs)} steps for {trainer.num_train_epochs} epochs"
    )


def _encode(conversation: Conversation, data: DataModule) -> Encoded | None:
    result = encode_conversation(
        conversation, data.tokenizer, data.cfg.max_length, data.cfg.overlength, data.cfg.train_on_prompt
    )
    return result if isinstance(result, Encoded) else None


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int], trained: bool) -> str:
    text = str(tokenizer.decode(ids))
    return f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text
