"""Prompt tokens are masked out of the loss; the assistant's answer (and its end of turn) is trained."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from qlora_exp.data.formats import UNSUPPORTED_LOSS_WEIGHT, Conversation, Drop, to_conversation
from qlora_exp.data.module import IGNORE_INDEX, alpaca_to_messages, tokenize_conversation
from qlora_exp.data.tokenization import ASSISTANT_FIRST, NO_TRAINABLE_TOKENS, Encoded, encode_conversation
from qlora_exp.embedded import resolve_embedded
from qlora_exp.schema import DataColumnsConfig


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


def _weighted(*weights: int | None) -> Conversation:
    """user / assistant "2" / user / assistant "4" with these loss weights, parsed from content parts
    that carry `value`, as the DataModule parses a row."""
    texts = [("user", "What is 1 + 1?"), ("assistant", "2"), ("user", "And 2 + 2?"), ("assistant", "4")]
    messages: list[dict[str, object]] = []
    for (role, text), weight in zip(texts, weights, strict=True):
        message: dict[str, object] = {"role": role, "content": [{"type": "text", "value": text}]}
        if weight is not None:
            message["loss_weight"] = weight
        messages.append(message)
    conversation = to_conversation({"messages": messages}, "messages", DataColumnsConfig(), {})
    assert isinstance(conversation, Conversation), conversation
    return conversation


def _encode(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, train_on_prompt: bool = False
) -> Encoded | Drop:
    return encode_conversation(conversation, tokenizer, 512, "drop", train_on_prompt=train_on_prompt)


def _prompt_length(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> int:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    return len(ids)


def test_loss_weight_zero_masks_its_assistant_turn_and_one_trains_its_turn_exactly(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    conversation = _weighted(0, 0, 0, 1)
    encoded = _encode(tokenizer, conversation)
    assert isinstance(encoded, Encoded)
    plain = tokenize_conversation(conversation.messages, tokenizer)  # no weights: both answers trained
    assert encoded.input_ids == plain["input_ids"]
    messages = conversation.messages
    first, second = _prompt_length(tokenizer, messages[:1]), _prompt_length(tokenizer, messages[:3])
    assert plain["labels"][first:second] != [IGNORE_INDEX] * (second - first)
    # Everything before the trained answer, the loss_weight=0 answer included, is -100 ...
    assert encoded.labels[:second] == [IGNORE_INDEX] * second
    # ... and the loss_weight=1 answer with its end of turn is labelled token for token.
    assert encoded.labels[second:] == encoded.input_ids[second:] == plain["labels"][second:]
    assert tokenizer.decode(encoded.labels[second:]) == "4<end_of_turn>\n"


def test_loss_weight_zero_masks_its_turn_with_train_on_prompt_too(tokenizer: PreTrainedTokenizerBase) -> None:
    conversation = _weighted(None, 0, None, None)
    encoded = _encode(tokenizer, conversation, train_on_prompt=True)
    assert isinstance(encoded, Encoded)
    start = _prompt_length(tokenizer, conversation.messages[:1])
    end = len(tokenizer.apply_chat_template(conversation.messages[:2], return_dict=True)["input_ids"])
    assert tokenizer.decode(encoded.input_ids[start:end]) == "2<end_of_turn>\n"
    assert encoded.labels[start:end] == [IGNORE_INDEX] * (end - start)
    assert (
        encoded.labels[:start] + encoded.labels[end:] == encoded.input_ids[:start] + encoded.input_ids[end:]
    )


@pytest.mark.parametrize(
    ("weight", "train_on_prompt", "fix"),
    [(1, False, "data.train_on_prompt=true"), (0, True, "data.train_on_prompt=false")],
)
def test_a_prompt_turns_loss_weight_against_train_on_prompt_is_dropped_with_the_fix(
    tokenizer: PreTrainedTokenizerBase, weight: int, train_on_prompt: bool, fix: str
) -> None:
    dropped = _encode(tokenizer, _weighted(weight, None, None, None), train_on_prompt)
    assert isinstance(dropped, Drop) and dropped.reason == UNSUPPORTED_LOSS_WEIGHT
    assert "message 0 (user) has loss_weight" in dropped.detail and f"Fix: set {fix}" in dropped.detail
    # A prompt turn's weight that agrees with data.train_on_prompt changes nothing.
    agreeing = _encode(tokenizer, _weighted(1 - weight, None, None, None), train_on_prompt)
    assert isinstance(agreeing, Encoded)
    assert agreeing == _encode(tokenizer, _weighted(None, None, None, None), train_on_prompt)


def test_a_conversation_whose_answers_all_have_loss_weight_zero_is_dropped(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    dropped = _encode(tokenizer, _weighted(None, 0, None, 0))
    assert isinstance(dropped, Drop) and dropped.reason == NO_TRAINABLE_TOKENS
