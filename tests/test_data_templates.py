"""Masking is exact at token level for real template styles: every assistant turn with its end of turn
is trained, nothing of system or user turns; templates that would make masking wrong are caught."""

from __future__ import annotations

import logging

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from qlora_exp.data.formats import Conversation, Drop
from qlora_exp.data.templates import CHATML_TEMPLATE
from qlora_exp.data.tokenization import (
    IGNORE_INDEX,
    NO_TRAINABLE_TOKENS,
    OVER_LENGTH,
    TEMPLATE_ERROR,
    TEMPLATE_INCONSISTENT,
    Encoded,
    TemplateMismatch,
    encode_conversation,
    end_of_turn_marker,
    resolve_chat_template,
    tokenize_conversation,
)
from qlora_exp.embedded import resolve_embedded
from qlora_exp.errors import DataError

# Qwen2.5's template without tools: a default system prompt when the data has none.
QWEN_STYLE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Llama-3.1's shape: a system header (with dates) always, <|eot_id|> ends every turn.
LLAMA3_STYLE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Mistral v0.3's habit: the system prompt goes into the *last* user turn, so prefixes differ.
MISTRAL_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{% if loop.last and system %}{{ '[INST] ' + system + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
# Qwen3's habit: an (empty) reasoning block only on answers after the last user turn.
QWEN3_STYLE = (
    "{%- set ns = namespace(last_query=-1) %}{%- for m in messages %}{%- if m['role'] == 'user' %}"
    "{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m['role'] == 'assistant' and loop.index0 > ns.last_query %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Hides earlier assistant turns: neither prefix-consistent nor locatable.
REDACTING = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ 'assistant: ...\\n' }}"
    "{% else %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
)
# Gemma-2-it's own template refuses system turns.
GEMMA_STRICT = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

MULTI_TURN = Conversation(
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]
)


@pytest.fixture(scope="module")
def base_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_embedded("embedded:tiny-gemma2"))


def _tokenizer(base: PreTrainedTokenizerBase, template: str | None) -> PreTrainedTokenizerBase:
    """A copy of the embedded tokenizer with the special tokens of the template styles above."""
    tokenizer = AutoTokenizer.from_pretrained(base.name_or_path)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    tokenizer.chat_template = template
    return tokenizer


def _encode(
    conversation: Conversation, tokenizer: PreTrainedTokenizerBase, **kwargs: object
) -> Encoded | Drop:
    options = {"max_length": 512, "overlength": "drop", "train_on_prompt": False} | kwargs
    return encode_conversation(conversation, tokenizer, **options)  # type: ignore[arg-type]


def _trained_text(tokenizer: PreTrainedTokenizerBase, encoded: Encoded | Drop) -> str:
    assert isinstance(encoded, Encoded), encoded
    return "|".join(
        tokenizer.decode([t])
        for t, label in zip(encoded.input_ids, encoded.labels, strict=True)
        if label != IGNORE_INDEX
    )


@pytest.mark.parametrize(
    ("template", "answers"),
    [
        (QWEN_STYLE, ("2<|im_end|>\n", "4<|im_end|>\n")),
        (LLAMA3_STYLE, ("2<|eot_id|>", "4<|eot_id|>")),
    ],
)
def test_every_assistant_turn_and_its_end_of_turn_is_trained_and_nothing_else(
    base_tokenizer: PreTrainedTokenizerBase, template: str, answers: tuple[str, str]
) -> None:
    tokenizer = _tokenizer(base_tokenizer, template)
    encoded = _encode(MULTI_TURN, tokenizer)
    assert isinstance(encoded, Encoded)
    trained = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "".join(answers)
    # Token level: the end-of-turn token itself is a label, and the trained runs are exactly two.
    end_of_turn = tokenizer.convert_tokens_to_ids(answers[0].removeprefix("2").strip())
    assert sum(label == end_of_turn for label in encoded.labels) == 2
    runs = sum(
        1
        for i, label in enumerate(encoded.labels)
        if label != IGNORE_INDEX and (i == 0 or encoded.labels[i - 1] == IGNORE_INDEX)
    )
    assert runs == 2
    assert all(
        label in (IGNORE_INDEX, token) for token, label in zip(encoded.input_ids, encoded.labels, strict=True)
    )


def test_train_on_prompt_trains_system_and_user_turns_too(base_tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer = _tokenizer(base_tokenizer, QWEN_STYLE)
    encoded = _encode(MULTI_TURN, tokenizer, train_on_prompt=True)
    assert isinstance(encoded, Encoded) and encoded.labels == encoded.input_ids


@pytest.mark.parametrize(
    ("template", "marker", "trained"),
    [
        (MISTRAL_STYLE, "<eos>", "2|<eos>|4|<eos>"),
        # The last answer's empty reasoning block follows its generation prompt: trained with it.
        (
            QWEN3_STYLE,
            "<|im_end|>\n",
            "2|<|im_end|>|\n|<|t|h|in|k|>|\n|\n|<|/|t|h|in|k|>|\n\n|4|<|im_end|>|\n",
        ),
    ],
)
def test_prefix_inconsistent_template_is_masked_by_locating_the_turns(
    base_tokenizer: PreTrainedTokenizerBase, template: str, marker: str, trained: str
) -> None:
    tokenizer = _tokenizer(base_tokenizer, template)
    with pytest.raises(TemplateMismatch):
        tokenize_conversation(MULTI_TURN.messages, tokenizer)
    assert end_of_turn_marker(tokenizer) == marker
    assert _trained_text(tokenizer, _encode(MULTI_TURN, tokenizer)) == trained


def test_turns_that_cannot_be_located_drop_the_row_instead_of_mislabelling(
    base_tokenizer: PreTrainedTokenizerBase,
) -> None:
    dropped = _encode(MULTI_TURN, _tokenizer(base_tokenizer, REDACTING))
    assert isinstance(dropped, Drop) and dropped.reason == TEMPLATE_INCONSISTENT
    assert "data.chat_template" in dropped.detail


def test_template_refusing_a_conversation_is_a_counted_drop_with_the_fix(
    base_tokenizer: PreTrainedTokenizerBase,
) -> None:
    dropped = _encode(MULTI_TURN, _tokenizer(base_tokenizer, GEMMA_STRICT))
    assert isinstance(dropped, Drop) and dropped.reason == TEMPLATE_ERROR
    assert "System role not supported" in dropped.detail and "data.chat_template" in dropped.detail


def test_named_fallback_when_the_tokenizer_has_none(
    base_tokenizer: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture
) -> None:
    tokenizer = _tokenizer(base_tokenizer, None)
    with caplog.at_level(logging.WARNING):
        assert resolve_chat_template(tokenizer, None) == CHATML_TEMPLATE
    assert "no chat template" in caplog.text and "chatml" in caplog.text
    assert _trained_text(tokenizer, _encode(MULTI_TURN, tokenizer)) == "2|<|im_end|>|\n|4|<|im_end|>|\n"


def test_chat_template_setting_takes_a_name_or_jinja(base_tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer = _tokenizer(base_tokenizer, QWEN_STYLE)
    resolve_chat_template(tokenizer, "llama3")
    assert "<|eot_id|>" in _trained_text(tokenizer, _encode(MULTI_TURN, tokenizer))
    resolve_chat_template(tokenizer, QWEN_STYLE)
    assert tokenizer.chat_template == QWEN_STYLE
    with pytest.raises(DataError, match=r"data.chat_template: 'qwen9'.*chatml, gemma, llama3"):
        resolve_chat_template(tokenizer, "qwen9")


def test_raw_text_trains_every_token_and_ends_with_eos(base_tokenizer: PreTrainedTokenizerBase) -> None:
    text = Conversation([{"role": "assistant", "content": "Once upon a time."}], raw=True)
    encoded = _encode(text, base_tokenizer)
    assert isinstance(encoded, Encoded)
    assert encoded.labels == encoded.input_ids and encoded.input_ids[-1] == base_tokenizer.eos_token_id


def test_raw_prompt_completion_trains_the_completion_and_eos_only(
    base_tokenizer: PreTrainedTokenizerBase,
) -> None:
    pair = Conversation(
        [{"role": "user", "content": "What is 3 + 5?"}, {"role": "assistant", "content": " 8"}], raw=True
    )
    assert _trained_text(base_tokenizer, _encode(pair, base_tokenizer)).replace("|", "") == " 8<eos>"


def test_overlength_policies(base_tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer = _tokenizer(base_tokenizer, QWEN_STYLE)
    full = _encode(MULTI_TURN, tokenizer)
    assert isinstance(full, Encoded)
    limit = len(full.input_ids) - 3
    dropped = _encode(MULTI_TURN, tokenizer, max_length=limit)
    assert isinstance(dropped, Drop) and dropped.reason == OVER_LENGTH
    cut = _encode(MULTI_TURN, tokenizer, max_length=limit, overlength="truncate")
    assert isinstance(cut, Encoded) and cut.truncated
    assert cut.input_ids == full.input_ids[:limit] and cut.labels == full.labels[:limit]
    # Cut before the first answer: nothing left to train on.
    first_answer = full.labels.index(next(label for label in full.labels if label != IGNORE_INDEX))
    empty = _encode(MULTI_TURN, tokenizer, max_length=first_answer, overlength="truncate")
    assert isinstance(empty, Drop) and empty.reason == NO_TRAINABLE_TOKENS


@pytest.mark.parametrize(
    ("template", "trained", "masked"),
    [(QWEN_STYLE, "4|<|im_end|>|\n", "2|<|im_end|>|\n"), (MISTRAL_STYLE, "4|<eos>", "2|<eos>")],
)
def test_an_answer_with_loss_weight_zero_is_masked_and_one_is_trained(
    base_tokenizer: PreTrainedTokenizerBase, template: str, trained: str, masked: str
) -> None:
    """Weights hold with both masking methods: Mistral's rendering up to the masked first answer puts
    the system prompt elsewhere than the whole does, so with train_on_prompt that turn is located."""
    weighted = Conversation(MULTI_TURN.messages, loss_weights=[None, None, 0, None, 1])
    tokenizer = _tokenizer(base_tokenizer, template)
    assert _trained_text(tokenizer, _encode(weighted, tokenizer)) == trained
    everything = _encode(weighted, tokenizer, train_on_prompt=True)
    assert isinstance(everything, Encoded)
    untrained = "|".join(
        tokenizer.decode([token])
        for token, label in zip(everything.input_ids, everything.labels, strict=True)
        if label == IGNORE_INDEX
    )
    assert untrained == masked


# Each embedded family's own template (data/templates.py) on MULTI_TURN: the answers and their end of
# turn, nothing else. Gemma-3 folds the system turn into the first user turn; Gemma-4 26B/31B's
# generation prompt ends in an empty thought channel the rendered answers lack (located, with
# <turn|> found without it); Qwen3 writes an empty reasoning block before the last answer only.
FAMILY_ANSWERS = {
    "tiny-gemma3": "2<end_of_turn>\n4<end_of_turn>\n",
    "tiny-gemma4": "2<turn|>\n4<turn|>\n",
    "tiny-gemma4-mm": "2<turn|>\n4<turn|>\n",
    "tiny-qwen3": "2<|im_end|>\n<think>\n\n</think>\n\n4<|im_end|>\n",
    "tiny-llama": "2<|eot_id|>4<|eot_id|>",
    "tiny-mistral": "2</s>4</s>",
}
# Mistral v0.3 puts the system prompt into the last user turn only: a conversation that ends with an
# answer renders without it (the released template's behaviour, kept).
DROPS_THE_SYSTEM_TURN = {"tiny-mistral"}


def _family_tokenizer(name: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_embedded(f"embedded:{name}"))


@pytest.mark.parametrize(("name", "trained"), FAMILY_ANSWERS.items())
def test_each_family_template_trains_exactly_the_answers(name: str, trained: str) -> None:
    tokenizer = _family_tokenizer(name)
    encoded = _encode(MULTI_TURN, tokenizer)
    assert isinstance(encoded, Encoded), encoded
    answers = [token for token, label in zip(encoded.input_ids, encoded.labels, strict=True) if label >= 0]
    assert tokenizer.decode(answers) == trained
    assert ("Answer briefly." in tokenizer.decode(encoded.input_ids)) != (name in DROPS_THE_SYSTEM_TURN)


def test_gemma3_template_takes_a_system_turn_into_the_first_user_turn() -> None:
    rendered = _family_tokenizer("tiny-gemma3").apply_chat_template(MULTI_TURN.messages, tokenize=False)
    assert "<start_of_turn>user\nAnswer briefly.\n\nWhat is 1 + 1?<end_of_turn>" in str(rendered)


def test_qwen3_single_and_multi_turn_rows_train_the_last_answer_alike() -> None:
    """Qwen3 renders an (empty) reasoning block before the answer the model generates: a one-turn row
    (prefix masking) and the last answer of a longer row (located) both train it."""
    tokenizer = _family_tokenizer("tiny-qwen3")
    single = _encode(Conversation(MULTI_TURN.messages[1:3]), tokenizer)
    assert isinstance(single, Encoded)
    assert tokenizer.decode(
        [t for t, label in zip(single.input_ids, single.labels, strict=True) if label >= 0]
    ) == ("<think>\n\n</think>\n\n2<|im_end|>\n")


def test_qwen3_keeps_the_last_answers_reasoning_and_drops_rows_whose_earlier_reasoning_it_strips() -> None:
    tokenizer = _family_tokenizer("tiny-qwen3")
    reasoned = [
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "<think>\nadd one\n</think>\n\n2"},
        {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "<think>\nadd two\n</think>\n\n4"},
    ]
    last = _encode(Conversation(reasoned[2:]), tokenizer)
    assert isinstance(last, Encoded)
    assert tokenizer.decode(
        [t for t, label in zip(last.input_ids, last.labels, strict=True) if label >= 0]
    ) == ("<think>\nadd two\n</think>\n\n4<|im_end|>\n")
    # The template drops the first answer's reasoning from the history: that text cannot be trained
    # as the data has it, so the row is a counted drop rather than a mislabelled one.
    dropped = _encode(Conversation(reasoned), tokenizer)
    assert isinstance(dropped, Drop) and dropped.reason == TEMPLATE_INCONSISTENT
