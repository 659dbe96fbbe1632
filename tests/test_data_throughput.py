"""The batched encoding the data pipeline's speed comes from gives exactly what encoding one conversation
at a time gives; the throughput benchmark runs and reports its rates."""

from __future__ import annotations

import logging
import re
import runpy
import sys

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from qlora_exp.data import tokenization
from qlora_exp.data.formats import Conversation, Drop
from qlora_exp.data.tokenization import (
    OVER_LENGTH,
    TEMPLATE_ERROR,
    encode_conversation,
    encode_conversations,
    tokenize_conversation,
)
from qlora_exp.embedded import resolve_embedded
from tests.support import REPO

# Refuses a system turn, as Gemma-2-it's own template does.
STRICT = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)


def _turns(*contents: str) -> Conversation:
    roles = ["user", "assistant"] * len(contents)
    return Conversation([{"role": r, "content": c} for r, c in zip(roles, contents, strict=False)])


MIXED = [
    _turns("What is 1 + 1?", "2"),
    _turns("What is 1 + 1?", "2"),  # the same renderings twice in one batch
    _turns("What is 1 + 1?", "two"),  # the same prompt, another answer
    _turns("Sort 3, 1, 2.", "1, 2, 3", "And backwards?", "3, 2, 1"),
    Conversation([{"role": "system", "content": "Be brief."}, *_turns("Hi", "Hello").messages]),
    Conversation([{"role": "assistant", "content": "plain text " * 3}], raw=True),
    _turns("Write this word backwards. " * 40, "x " * 200),  # over max_length
    _turns("计算 3 + 4 的结果。", "7"),
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_embedded("embedded:tiny-gemma2"))


@pytest.mark.parametrize("template", [None, STRICT])
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_batched_encoding_equals_one_conversation_at_a_time(
    tokenizer: PreTrainedTokenizerBase,
    monkeypatch: pytest.MonkeyPatch,
    template: str | None,
    train_on_prompt: bool,
) -> None:
    if template:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
        tokenizer.chat_template = template
    options = {"max_length": 256, "overlength": "drop", "train_on_prompt": train_on_prompt}
    one_by_one = [encode_conversation(c, tokenizer, **options) for c in MIXED]  # type: ignore[arg-type]
    monkeypatch.setattr(tokenization, "ENCODE_BATCH_SIZE", 3)  # batches that split the list unevenly
    batched = encode_conversations(MIXED, tokenizer, **options)  # type: ignore[arg-type]
    assert batched == one_by_one
    reasons = [r.reason for r in batched if isinstance(r, Drop)]
    assert OVER_LENGTH in reasons
    assert (TEMPLATE_ERROR in reasons) == (template == STRICT)


def test_ids_are_what_transformers_tokenizing_the_template_gives(tokenizer: PreTrainedTokenizerBase) -> None:
    for conversation in MIXED:
        if conversation.raw:
            continue
        expected = tokenizer.apply_chat_template(conversation.messages, tokenize=True, return_dict=True)
        assert tokenize_conversation(conversation.messages, tokenizer)["input_ids"] == expected["input_ids"]


def test_benchmark_prints_a_positive_rate_per_tokenizer_and_packing_mode(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `python benchmarks/data_prep.py ARGS`, run in this process as the interpreter runs a script.
    script = REPO / "benchmarks" / "data_prep.py"
    args = ["--rows=60", "--real-vocab=600", "--corpus-mb=0.3", "--packing", "none", "packed"]
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    # The script quiets two loggers for its table, as a script may: give them back to the suite.
    quieted = [logging.getLogger(name) for name in ("qlora_exp.data.module", "qlora_exp.data.cache")]
    levels = [logger.level for logger in quieted]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        for logger, level in zip(quieted, levels, strict=True):
            logger.setLevel(level)
    stdout = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in stdout.splitlines() if re.match(r"\| (tiny|real) ", line)]
    assert [(r[0].strip(), r[2].strip()) for r in rows] == [
        ("tiny", "none"),
        ("tiny", "packed"),
        ("real", "none"),
        ("real", "packed"),
    ]
    for row in rows:
        assert int(row[3]) == 60  # every generated row was read
        assert float(row[8].replace(",", "")) > 0  # examples/min
        assert float(row[9].replace(",", "")) > 0  # tokens/s
