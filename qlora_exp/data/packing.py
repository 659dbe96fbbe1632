"""Batches without padding waste: padding-free flattening, and packing examples into fixed-capacity bins.

Both modes hand the model one flattened row per batch, with position_ids restarting at every
example and no attention_mask. transformers then builds a block-diagonal causal mask from the
position ids (`masking_utils.find_packed_sequence_indices`) for eager, sdpa and flex attention,
and flash attention derives its varlen boundaries from them, so no example attends to another.
transformers does this only when no KV cache is in play: every batch carries use_cache=False, as
TRL's SFTTrainer.compute_loss sets it, because a model whose config says use_cache=true would
otherwise build a cache and silently fall back to one causal mask over all examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, PreTrainedTokenizerBase

from qlora_exp.data.tokenization import IGNORE_INDEX

PACKING_MODES = ("none", "padding_free", "packed")


class FlatteningCollator(DataCollatorWithFlattening):
    """transformers' padding-free collator, for single examples or packed bins (split at `seq_lengths`),
    with use_cache=False so that the model's packed-sequence mask is used (see the module docstring)."""

    def __call__(
        self,
        features: list[dict[str, Any]],
        return_tensors: str | None = None,
        separator_id: int | None = None,
    ) -> dict[str, Any]:
        examples = [example for feature in features for example in unpack_bin(feature)]
        batch = super().__call__(examples, return_tensors=return_tensors, separator_id=separator_id)
        batch["use_cache"] = False
        return batch


def unpack_bin(feature: dict[str, Any]) -> list[dict[str, Any]]:
    """The examples a packed bin holds (one feature as-is when it is not a bin)."""
    if "seq_lengths" not in feature:
        return [feature]
    examples, start = [], 0
    for length in feature["seq_lengths"]:
        end = start + int(length)
        examples.append(
            {"input_ids": feature["input_ids"][start:end], "labels": feature["labels"][start:end]}
        )
        start = end
    return examples


def pack_examples(dataset: Dataset, capacity: int) -> Dataset:
    """Examples binned best-fit-decreasing into rows of at most `capacity` tokens (TRL's `pack_dataset`),
    each row listing its examples' lengths in `seq_lengths`."""
    # TRL imported here, not at the top: only data.packing needs it, and its import (~1 s, W&B
    # included) would otherwise be paid by every process that trains or reads data.
    from trl import pack_dataset  # noqa: PLC0415

    return pack_dataset(dataset.select_columns(["input_ids", "labels"]), capacity, strategy="bfd")


def build_collator(
    packing: str, tokenizer: PreTrainedTokenizerBase, *, pad_to: int | None = None
) -> DataCollatorForSeq2Seq | FlatteningCollator:
    """`none`: pad each batch to its own longest row; otherwise flatten (see the module docstring).

    `pad_to` pads `none` batches to that fixed length instead: the prototype's layout, which
    qlora-bench times against the others.
    """
    if packing == "none":
        return DataCollatorForSeq2Seq(
            tokenizer,
            padding="longest" if pad_to is None else "max_length",
            max_length=pad_to,
            label_pad_token_id=IGNORE_INDEX,
            return_tensors="pt",
        )
    return FlatteningCollator(separator_id=IGNORE_INDEX)


def token_slots(lengths: Sequence[int], packing: str, batch_size: int) -> int:
    """Token positions the model computes over for these example lengths, batched in order.

    `none` pads every batch to its longest example; the flattening modes compute over real tokens only.
    """
    if packing != "none":
        return int(sum(lengths))
    return sum(
        max(lengths[start : start + batch_size]) * len(lengths[start : start + batch_size])
        for start in range(0, len(lengths), batch_size)
    )


def steps_per_epoch(rows: int, batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one epoch over `rows` (examples or packed bins) on one device."""
    return max(1, math.ceil(math.ceil(rows / batch_size) / accumulation))
