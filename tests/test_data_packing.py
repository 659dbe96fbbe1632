"""Padding-free and packed batches: every token once, labels aligned, positions restart per example,
and the loss equals the unpacked loss on the real QLoRA model."""

from __future__ import annotations

import itertools

import pytest
import torch
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from qlora_exp.data.module import DataModule
from qlora_exp.data.packing import FlatteningCollator, pack_examples, token_slots
from qlora_exp.data.tokenization import IGNORE_INDEX
from qlora_exp.model import build_quantized_model, load_tokenizer
from qlora_exp.schema import Config

# Per example: its length, and which of its labels are masked.
EXAMPLES = st.lists(
    st.integers(min_value=1, max_value=40).flatmap(
        lambda n: st.tuples(st.just(n), st.lists(st.booleans(), min_size=n, max_size=n))
    ),
    min_size=1,
    max_size=12,
)


def _features(examples: list[tuple[int, list[bool]]]) -> list[dict[str, list[int]]]:
    """Token ids unique across examples, so 'exactly once' can be checked."""
    features = []
    for index, (length, masked) in enumerate(examples):
        ids = [index * 1000 + position + 1 for position in range(length)]
        labels = [IGNORE_INDEX if m else token for token, m in zip(ids, masked, strict=True)]
        features.append({"input_ids": ids, "labels": labels})
    return features


def _segments(batch: dict) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(ids, labels) of each example in a flattened batch, cut where position_ids restart at 0."""
    ids, labels, positions = (batch[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
    for start, end in itertools.pairwise(starts):
        assert positions[start:end] == list(range(end - start)), "positions must count up within an example"
    return [(tuple(ids[s:e]), tuple(labels[s:e])) for s, e in itertools.pairwise(starts)]


def _expected(features: list[dict[str, list[int]]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    # The first label of each example is never a target (the model shifts labels by one), and it must
    # not be: it would be predicted from the previous example's last token.
    return [(tuple(f["input_ids"]), (IGNORE_INDEX, *f["labels"][1:])) for f in features]


@given(examples=EXAMPLES)
@settings(max_examples=60, deadline=None)
def test_padding_free_keeps_order_tokens_labels_and_restarts_positions(examples: list) -> None:
    features = _features(examples)
    batch = FlatteningCollator()(features)
    assert batch["use_cache"] is False and "attention_mask" not in batch
    assert _segments(batch) == _expected(features)


@given(examples=EXAMPLES, capacity=st.integers(min_value=40, max_value=120))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_packed_bins_hold_every_example_once_within_capacity(examples: list, capacity: int) -> None:
    features = _features(examples)
    bins = pack_examples(Dataset.from_list(features), capacity)
    assert all(len(row["input_ids"]) <= capacity for row in bins)
    assert sum(len(row["seq_lengths"]) for row in bins) == len(features)
    batch = FlatteningCollator()([bins[i] for i in range(len(bins))])
    assert sorted(_segments(batch)) == sorted(_expected(features))


def test_token_slots_count_padding_only_without_flattening() -> None:
    assert token_slots([3, 5, 2], "none", batch_size=2) == 5 * 2 + 2
    assert token_slots([3, 5, 2], "padding_free", batch_size=2) == 10
    assert token_slots([3, 5, 2], "packed", batch_size=2) == 10


@pytest.fixture
def qlora_model_and_examples(smoke_schema: Config) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, list]:
    """The real factory's 4-bit tiny Gemma-2 with LoRA (eager attention), and real tokenized examples."""
    smoke_schema.data.synthetic_size = 10
    smoke_schema.data.val_fraction = 0.2
    data = DataModule(smoke_schema.data, load_tokenizer(smoke_schema.model), smoke_schema.seed)
    data.setup()
    assert data.train_dataset is not None
    examples = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in data.train_dataset]
    model = build_quantized_model(smoke_schema.model, smoke_schema.lora).eval()
    return model, data.tokenizer, examples


def _loss(model: torch.nn.Module, batch: dict) -> float:
    with torch.no_grad():
        tensors = {k: (torch.as_tensor(v) if isinstance(v, list) else v) for k, v in batch.items()}
        return float(model(**tensors).loss)


@pytest.mark.slow
def test_packed_and_padding_free_loss_equals_unpacked_loss(qlora_model_and_examples: tuple) -> None:
    model, tokenizer, examples = qlora_model_and_examples
    assert model.config._attn_implementation == "eager"
    # Unpacked: one padded batch with an attention mask; its loss is the mean over all target tokens.
    padded = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)(examples)
    unpacked = _loss(model, padded)
    padding_free = _loss(model, FlatteningCollator()(examples))
    capacity = 2 * max(len(e["input_ids"]) for e in examples)
    bins = pack_examples(Dataset.from_list(examples), capacity)
    assert len(bins) < len(examples)  # some bins really hold several examples
    packed = _loss(model, FlatteningCollator()([bins[i] for i in range(len(bins))]))
    assert abs(padding_free - unpacked) < 1e-4
    assert abs(packed - unpacked) < 1e-4
    # Control: with the model's default use_cache=True, transformers skips the per-example mask,
    # examples attend to each other and the loss moves; this is why the collator sends use_cache=False.
    leaky = _loss(model, {**FlatteningCollator()(examples), "use_cache": True})
    assert abs(leaky - unpacked) > 1e-3
