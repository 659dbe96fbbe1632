"""Every format users bring becomes the same conversation; rows that cannot are dropped by reason."""

from __future__ import annotations

import pytest

from qlora_exp.data.formats import (
    MALFORMED,
    MISSING_FIELD,
    NON_TEXT,
    UNMAPPABLE_ROLE,
    UNSUPPORTED_LOSS_WEIGHT,
    Conversation,
    Drop,
    detect_format,
    to_conversation,
)
from qlora_exp.errors import DataError
from qlora_exp.schema import DataColumnsConfig

COLUMNS = DataColumnsConfig()
QA = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}]


def _convert(
    row: object, fmt: str, role_map: dict[str, str] | None = None, **columns: str
) -> Conversation | Drop:
    return to_conversation(row, fmt, DataColumnsConfig(**columns), role_map or {})


def test_alpaca_with_input_system_and_history() -> None:
    row = {
        "system": "Be brief.",
        "history": [["Hi", "Hello!"]],
        "instruction": "Sort these numbers.",
        "input": "3, 1, 2",
        "output": "1, 2, 3",
    }
    assert _convert(row, "alpaca") == Conversation(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Sort these numbers.\n\n3, 1, 2"},
            {"role": "assistant", "content": "1, 2, 3"},
        ]
    )


def test_openai_messages_multi_turn_with_system_and_text_parts() -> None:
    row = {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "What is 1 + 1?"}]},
            {"role": "assistant", "content": "2"},
            {"role": "user", "content": "And 2 + 2?"},
            {"role": "assistant", "content": "4"},
        ]
    }
    result = _convert(row, "messages")
    assert isinstance(result, Conversation) and not result.raw
    assert [m["role"] for m in result.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert result.messages[1]["content"] == "What is 1 + 1?"


def test_sharegpt_roles_map_to_chat_roles() -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "Be kind."},
            {"from": "human", "value": "What is 1 + 1?"},
            {"from": "gpt", "value": "2"},
        ]
    }
    assert _convert(row, "sharegpt") == Conversation([{"role": "system", "content": "Be kind."}, *QA])


def test_sharegpt_tool_roles_are_rejected_with_the_fix_unless_mapped() -> None:
    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "weather"}'},
            {"from": "observation", "value": "18C"},
            {"from": "gpt", "value": "18C and sunny."},
        ]
    }
    dropped = _convert(row, "sharegpt")
    assert isinstance(dropped, Drop) and dropped.reason == UNMAPPABLE_ROLE
    assert "function_call" in dropped.detail and "data.role_map.function_call=" in dropped.detail
    mapped = _convert(row, "sharegpt", {"function_call": "assistant", "observation": "user"})
    assert isinstance(mapped, Conversation)
    assert [m["role"] for m in mapped.messages] == ["user", "assistant", "user", "assistant"]


def test_string_prompt_completion_is_raw_and_conversational_pairs_use_the_template() -> None:
    raw = _convert({"prompt": "The capital of France is", "completion": " Paris."}, "prompt_completion")
    assert raw == Conversation(
        [
            {"role": "user", "content": "The capital of France is"},
            {"role": "assistant", "content": " Paris."},
        ],
        raw=True,
    )
    chat = _convert({"prompt": QA[:1], "completion": QA[1:]}, "prompt_completion")
    assert chat == Conversation(QA)


def test_plain_text_is_one_raw_trained_part() -> None:
    assert _convert({"text": "Once upon a time."}, "text") == Conversation(
        [{"role": "assistant", "content": "Once upon a time."}], raw=True
    )


def test_columns_map_other_names() -> None:
    row = {"question": "What is 1 + 1?", "answer": "2"}
    result = _convert(row, "alpaca", instruction="question", output="answer")
    assert result == Conversation(QA)
    chat = {"dialog": [{"speaker": "user", "text": "What is 1 + 1?"}, {"speaker": "bot", "text": "2"}]}
    assert _convert(chat, "messages", messages="dialog", role="speaker", content="text") == Conversation(QA)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"messages": QA}, "messages"),
        ({"conversations": [{"from": "human", "value": "x"}]}, "sharegpt"),
        ({"instruction": "x", "input": "", "output": "y"}, "alpaca"),
        ({"prompt": "x", "completion": "y"}, "prompt_completion"),
        ({"text": "x"}, "text"),
    ],
)
def test_auto_detects_each_format(row: dict, expected: str) -> None:
    assert detect_format([row], COLUMNS) == expected


def test_auto_detect_follows_column_mapping_and_names_the_columns_when_nothing_fits() -> None:
    assert (
        detect_format([{"question": "x", "output": "y"}], DataColumnsConfig(instruction="question"))
        == "alpaca"
    )
    with pytest.raises(DataError, match=r"\['answer', 'question'\].*data.columns"):
        detect_format([{"question": "x", "answer": "y"}], COLUMNS)


@pytest.mark.parametrize(
    ("row", "fmt", "reason"),
    [
        ({"instruction": "", "output": "y"}, "alpaca", MISSING_FIELD),
        ({"instruction": "x", "output": "   "}, "alpaca", MISSING_FIELD),
        ({"instruction": "x"}, "alpaca", MISSING_FIELD),
        ({"instruction": "x", "output": "y", "history": "not a list"}, "alpaca", MALFORMED),
        ({"messages": []}, "messages", MISSING_FIELD),
        ({"messages": [{"role": "user", "content": ""}, QA[1]]}, "messages", MISSING_FIELD),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages", UNMAPPABLE_ROLE),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages", NON_TEXT),
        ({"messages": QA, "images": ["cat.png"]}, "messages", NON_TEXT),  # TRL's vision datasets
        ({"instruction": "Describe it.", "output": "A cat.", "image": "cat.png"}, "alpaca", NON_TEXT),
        ({"prompt": "x", "completion": ""}, "prompt_completion", MISSING_FIELD),
        ({"text": None}, "text", MISSING_FIELD),
        (["not", "an", "object"], "text", MALFORMED),
    ],
)
def test_bad_rows_are_dropped_with_a_reason(row: object, fmt: str, reason: str) -> None:
    result = _convert(row, fmt)
    assert isinstance(result, Drop) and result.reason == reason and result.detail


def test_empty_system_turn_is_skipped_not_dropped() -> None:
    assert _convert({"messages": [{"role": "system", "content": ""}, *QA]}, "messages") == Conversation(QA)


def test_content_parts_carrying_value_and_loss_weights_travel_with_the_conversation() -> None:
    """An export format: every content part is `{"type": "text", "value": ...}`, every message may
    carry a `loss_weight` (0 or 1; booleans count)."""
    row = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "value": "Be brief."}], "loss_weight": 0},
            {
                "role": "user",
                "content": [{"type": "text", "value": "What is "}, {"type": "text", "value": "1 + 1?"}],
                "loss_weight": 0.0,
            },
            {"role": "assistant", "content": [{"type": "text", "value": "2"}], "loss_weight": 0},
            {"role": "user", "content": [{"type": "text", "value": "而 2 + 2 呢？"}]},
            {"role": "assistant", "content": [{"type": "text", "value": "4"}], "loss_weight": True},
        ]
    }
    assert _convert(row, "messages") == Conversation(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 1 + 1?"},
            {"role": "assistant", "content": "2"},
            {"role": "user", "content": "而 2 + 2 呢？"},
            {"role": "assistant", "content": "4"},
        ],
        loss_weights=[0, 0, 0, None, 1],
    )
    renamed = {"messages": [QA[0], {**QA[1], "weight": 0}]}
    assert _convert(renamed, "messages", loss_weight="weight") == Conversation(QA, loss_weights=[None, 0])
    # Rows without any loss_weight keep the plain form.
    assert _convert({"messages": QA}, "messages") == Conversation(QA)


@pytest.mark.parametrize("weight", [0.5, 2, "1", [1]])
def test_a_loss_weight_other_than_0_or_1_is_dropped_naming_the_fix(weight: object) -> None:
    row = {"messages": [QA[0], {**QA[1], "loss_weight": weight}]}
    result = _convert(row, "messages")
    assert isinstance(result, Drop) and result.reason == UNSUPPORTED_LOSS_WEIGHT
    assert "message 1 (assistant)" in result.detail and "Fix: set loss_weight to 0 or 1" in result.detail
