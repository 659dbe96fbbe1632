"""Prompt tokens are masked out of the loss; the assistant's answer (and its end of turn) is trained."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from qlora_exp.data import IGNORE_INDEX, alpaca_to_messages, tokenize_conversation
from qlora_exp.data_formats import Conversation, Drop
from qlora_exp.embedded_model import resolve_embedded
from qlora_exp.tokenization import ASSISTANT_FIRST, Encoded, encode_conversation


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_embedded("embedded:tiny-gemma2"))


def _trained_text(tokenizer: PreTrainedTokenizerBase, encoded: dict[str, list[int]]) -> str:
    trained = [
        t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label != IGNORE_INDEX
    ]
    return tokenizer.decode(trained)


def test_prompt_labels_are_masked_and_response_labels_are_not(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = alpaca_to_messages(
        {"instruction": "Sort these numbers.", "input": "3, 1, 2", "output": "1, 2, 3"}
    )
    encoded = tokenize_conversation(messages, tokenizer)
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    assert encoded["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert encoded["labels"][len(prompt) :] == encoded["input_ids"][len(prompt) :]
    assert _trained_text(tokenizer, encoded) == "1, 2, 3<end_of_turn>\n"


def test_chinese_instruction_masks_the_same_way(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = alpaca_to_messages({"instruction": "计算 3 + 5 的结果。", "output": "8"})
    assert _trained_text(tokenizer, tokenize_conversation(messages, tokenizer)) == "8<end_of_turn>\n"


def test_every_assistant_turn_is_trained_and_no_user_turn(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]
    text = _trained_text(tokenizer, tokenize_conversation(messages, tokenizer))
    assert text == "2<end_of_turn>\n4<end_of_turn>\n"


def test_train_on_prompt_trains_every_token(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = alpaca_to_messages({"instruction": "Reverse it.", "input": "abc", "output": "cba"})
    encoded = tokenize_conversation(messages, tokenizer, train_on_prompt=True)
    assert encoded["labels"] == encoded["input_ids"]


def test_a_conversation_opening_with_the_assistant_is_dropped_with_the_fix(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    opening = Conversation(
        [
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "What is 1 + 1?"},
            {"role": "assistant", "content": "2"},
        ]
    )
    dropped = encode_conversation(opening, tokenizer, 512, "drop", train_on_prompt=False)
    assert isinstance(dropped, Drop) and dropped.reason == ASSISTANT_FIRST
    assert "Fix:" in dropped.detail and "data.train_on_prompt=true" in dropped.detail
    # Trained on the whole text instead, it needs no prompt and is kept.
    kept = encode_conversation(opening, tokenizer, 512, "drop", train_on_prompt=True)
    assert isinstance(kept, Encoded) and kept.labels == kept.input_ids


def test_rows_with_empty_fields_are_not_conversations() -> None:
    assert alpaca_to_messages({"instruction": "", "output": "x"}) is None
    assert alpaca_to_messages({"instruction": "x", "output": "  "}) is None
