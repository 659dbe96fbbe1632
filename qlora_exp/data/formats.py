"""The formats users bring, each normalised to one internal form: a `Conversation`.

alpaca (instruction/input/output, optional system and history), OpenAI-style `messages`,
ShareGPT `conversations` (from/value), prompt/completion pairs and plain `text`. `data.columns.*`
renames columns; `data.format=auto` picks the format from the columns. A row that cannot become a
conversation yields a `Drop` with a reason (counted and shown by the DataModule), never silence.
A message's `loss_weight` (0 or 1) travels with the conversation; tokenization applies it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qlora_exp.errors import DataError
from qlora_exp.schema import DataColumnsConfig

log = logging.getLogger(__name__)

Message = dict[str, str]

# Drop reasons (the keys of data_stats.json's rows_dropped).
MISSING_FIELD = "missing_or_empty_field"
MALFORMED = "malformed_row"
UNMAPPABLE_ROLE = "unmappable_role"
NON_TEXT = "non_text_content"
# Columns vision-language datasets keep images in (TRL's and LLaVA's): such rows are not text-only.
IMAGE_COLUMNS = ("images", "image")
UNSUPPORTED_LOSS_WEIGHT = "unsupported_loss_weight"

# Role names the ecosystem uses for the three roles every chat template knows.
ROLE_ALIASES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
}


@dataclass(frozen=True)
class Conversation:
    """Turns with roles system / user / assistant. `raw`: tokenize the contents as they are, no chat
    template (plain text, and string prompt/completion pairs as TRL treats them). `loss_weights`: each
    message's `loss_weight` from the data (0: not trained, 1: trained, None: not given), or empty when
    no message has one. Kept beside the messages, not in them: the messages go to chat templates and
    to generation as the plain role/content dicts those expect."""

    messages: list[Message]
    raw: bool = False
    loss_weights: list[int | None] = field(default_factory=list)


@dataclass(frozen=True)
class Drop:
    """Why a row was not used, and a short detail for the log."""

    reason: str
    detail: str


class RowProblem(Exception):
    """Carries a Drop out of nested parsing (here and in the preference formats, data/preference.py)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.drop = Drop(reason, detail)


def detect_format(rows: Iterable[Any], columns: DataColumnsConfig) -> str:
    """The format whose columns the rows have (first 100 rows' keys); DataError when none fits."""
    keys: set[str] = set()
    for index, row in enumerate(rows):
        if index >= 100:
            break
        if isinstance(row, Mapping):
            keys.update(str(k) for k in row)
    candidates = (
        ("messages", (columns.messages,)),
        ("sharegpt", (columns.conversations,)),
        ("alpaca", (columns.instruction, columns.output)),
        ("prompt_completion", (columns.prompt, columns.completion)),
        ("text", (columns.text,)),
    )
    for name, needed in candidates:
        if all(column in keys for column in needed):
            return name
    preference = {columns.chosen, columns.rejected} <= keys
    pairs = " These look like preference pairs: train them with method=dpo." if preference else ""
    raise DataError(
        f"data.format=auto: no known format matches the columns {sorted(keys)}.{pairs} Fix: set data.format "
        "(alpaca, messages, sharegpt, prompt_completion, text) and map your column names with "
        "data.columns.* (e.g. data.columns.instruction=question data.columns.output=answer)"
    )


def to_conversation(
    row: Any, fmt: str, columns: DataColumnsConfig, role_map: Mapping[str, str]
) -> Conversation | Drop:
    """One source row in the internal form, or why it cannot be used."""
    if (unusable := _unusable_row(row)) is not None:
        return unusable
    try:
        if fmt == "alpaca":
            return _from_alpaca(row, columns)
        if fmt in ("messages", "sharegpt"):
            column = columns.messages if fmt == "messages" else columns.conversations
            return _weighted(parse_messages(_required(row, column), columns, role_map))
        if fmt == "prompt_completion":
            return _from_prompt_completion(row, columns, role_map)
        if fmt == "text":
            return Conversation(
                [{"role": "assistant", "content": _required_text(row, columns.text)}], raw=True
            )
    except RowProblem as problem:
        return problem.drop
    raise ValueError(f"unknown format {fmt!r}")  # the schema allows only the formats above


def alpaca_to_messages(
    row: Mapping[str, Any], columns: DataColumnsConfig | None = None
) -> list[Message] | None:
    """One alpaca row as a conversation; None when a required field is missing or empty."""
    result = to_conversation(row, "alpaca", columns or DataColumnsConfig(), {})
    return result.messages if isinstance(result, Conversation) else None


def _unusable_row(row: Any) -> Drop | None:
    """Why `row` cannot become a text conversation in any format: not an object, or images in it."""
    if not isinstance(row, Mapping):
        return Drop(MALFORMED, f"expected an object with columns, got {type(row).__name__}")
    images = [column for column in IMAGE_COLUMNS if row.get(column)]
    if images:
        return Drop(
            NON_TEXT,
            f"the row carries images ({', '.join(images)}); fine-tuning here is text-only (image+text "
            "training is not supported). Fix: leave the image rows out of the data",
        )
    return None


def _from_alpaca(row: Mapping[str, Any], columns: DataColumnsConfig) -> Conversation:
    instruction = _required_text(row, columns.instruction)
    extra = _optional_text(row, columns.input)
    output = _required_text(row, columns.output)
    messages: list[Message] = []
    system = _optional_text(row, columns.system)
    if system:
        messages.append({"role": "system", "content": system})
    history = row.get(columns.history) or []
    if not isinstance(history, list):
        raise RowProblem(MALFORMED, f"{columns.history!r} must be a list of [instruction, response] pairs")
    for turn, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RowProblem(MALFORMED, f"{columns.history!r}[{turn}] is not an [instruction, response] pair")
        question, answer = (str(part or "").strip() for part in pair)
        if not question or not answer:
            raise RowProblem(MISSING_FIELD, f"{columns.history!r}[{turn}] has an empty side")
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Conversation(messages)


def _from_prompt_completion(
    row: Mapping[str, Any], columns: DataColumnsConfig, role_map: Mapping[str, str]
) -> Conversation:
    prompt = _required(row, columns.prompt)
    completion = _required(row, columns.completion)
    if isinstance(prompt, str) and isinstance(completion, str):
        if not prompt.strip() or not completion.strip():
            raise RowProblem(MISSING_FIELD, "empty prompt or completion")
        return Conversation(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], raw=True
        )
    # Conversational pairs (TRL's format): lists of messages, or a string completion after them.
    head = parse_messages(prompt, columns, role_map)
    tail: list[tuple[Message, int | None]] = (
        [({"role": "assistant", "content": completion.strip()}, None)]
        if isinstance(completion, str) and completion.strip()
        else parse_messages(completion, columns, role_map)
    )
    return _weighted(head + tail)


def _weighted(turns: list[tuple[Message, int | None]]) -> Conversation:
    """The conversation of parsed turns, with their loss weights when any turn has one."""
    weights = [weight for _, weight in turns]
    has_weights = any(weight is not None for weight in weights)
    return Conversation([message for message, _ in turns], loss_weights=weights if has_weights else [])


def parse_messages(
    value: Any, columns: DataColumnsConfig, role_map: Mapping[str, str]
) -> list[tuple[Message, int | None]]:
    """Each message with its loss_weight (None when it has none); empty system messages left out."""
    if not isinstance(value, list) or not value:
        raise RowProblem(MALFORMED if value else MISSING_FIELD, "the message list is empty or not a list")
    messages: list[tuple[Message, int | None]] = []
    for turn, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise RowProblem(MALFORMED, f"message {turn} is a {type(message).__name__}, not an object")
        raw_role = message.get(columns.role, message.get("from"))
        role = role_map.get(str(raw_role)) or ROLE_ALIASES.get(str(raw_role).lower())
        if role is None:
            raise RowProblem(
                UNMAPPABLE_ROLE,
                f"message {turn} has role {raw_role!r}. Fix: map it, e.g. +data.role_map.{raw_role}=user "
                "(or assistant to train on it)",
            )
        content = _message_text(message.get(columns.content, message.get("value")), turn)
        if not content:
            if role == "system":
                continue  # an empty system prompt carries nothing
            raise RowProblem(MISSING_FIELD, f"message {turn} ({raw_role}) is empty")
        weight = _loss_weight(message.get(columns.loss_weight), columns.loss_weight, turn, raw_role)
        messages.append(({"role": role, "content": content}, weight))
    return messages


def _message_text(content: Any, turn: int) -> str:
    """A message's text: a string, or content parts that are all text, each carrying it under `text`
    (OpenAI) or `value` (a common export format)."""
    if content is None or isinstance(content, str):
        return (content or "").strip()
    if isinstance(content, list):
        kinds = {part.get("type") for part in content if isinstance(part, Mapping)}
        if kinds == {"text"} and all(isinstance(part, Mapping) for part in content):
            return "".join(str(part.get("text") or part.get("value") or "") for part in content).strip()
        raise RowProblem(
            NON_TEXT,
            f"message {turn} has non-text parts {sorted(map(str, kinds))}; fine-tuning here is text-only",
        )
    raise RowProblem(MALFORMED, f"message {turn}'s content is a {type(content).__name__}")


def _loss_weight(value: Any, key: str, turn: int, role: Any) -> int | None:
    """A message's loss weight as 0 or 1 (booleans count), None when absent. Other values are refused
    rather than rounded: a fractional weight would need a weighted loss, which training does not have."""
    if value is None:
        return None
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return int(value)
    raise RowProblem(
        UNSUPPORTED_LOSS_WEIGHT,
        f"message {turn} ({role}) has {key}={value!r}; only 0 (not trained) and 1 (trained) are "
        f"supported. Fix: set {key} to 0 or 1 in the data (or map another key: data.columns.loss_weight)",
    )


def _required(row: Mapping[str, Any], column: str) -> Any:
    value = row.get(column)
    if value is None or value in ("", []):
        raise RowProblem(MISSING_FIELD, f"column {column!r} is missing or empty")
    return value


def _required_text(row: Mapping[str, Any], column: str) -> str:
    text = _optional_text(row, column)
    if not text:
        raise RowProblem(MISSING_FIELD, f"column {column!r} is missing or empty")
    return text


def _optional_text(row: Mapping[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None:
        return ""
    if not isinstance(value, (str, int, float)):
        raise RowProblem(MALFORMED, f"column {column!r} is a {type(value).__name__}, expected text")
    return str(value).strip()
