"""Preference pairs (method=dpo): one prompt with a chosen and a rejected answer, in the layouts users
bring, tokenized with SFT's exact masks into what TRL's DPOTrainer trains on.

Formats (`data.format`; `auto` picks one from the columns, as for SFT):

- `preference` (TRL's): `prompt`, `chosen`, `rejected` as strings (tokenized as they are, no chat
  template, as TRL does) or message lists. Without a prompt, or when `chosen`/`rejected` hold the
  whole conversation, the prompt is their shared leading part (TRL's `extract_prompt`).
- `sharegpt`: `conversations` (the prompt turns, from/value) with `chosen`/`rejected` message
  objects (LLaMA-Factory's layout).
- `messages`: a `messages` history with `chosen`/`rejected` answers.
- `alpaca`: `instruction`, `input`, optional `system`/`history`, with `chosen`/`rejected` answers.

The prompt side is read by SFT's own parsers (roles, `data.role_map`, content parts, `data.columns`).
An answer is a string, a message object or a one-message list. Rows that cannot be used are counted
drops, as in SFT: an empty answer, the same answer twice, a malformed row, and everything
tokenization drops (over-length, a template that refuses the conversation).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from qlora_exp.data.cache import CachedData
from qlora_exp.data.formats import (
    MALFORMED,
    MISSING_FIELD,
    Conversation,
    Drop,
    Message,
    RowProblem,
    parse_messages,
    to_conversation,
)
from qlora_exp.data.module import DataModule, split_rows
from qlora_exp.data.packing import token_slots
from qlora_exp.data.sources import SourceRow
from qlora_exp.data.tokenization import IGNORE_INDEX, TEMPLATE_INCONSISTENT, Encoded, encode_conversations
from qlora_exp.errors import DataError
from qlora_exp.schema import Config, DataColumnsConfig

if TYPE_CHECKING:  # the collator's annotation; TRL is imported where it is used (_shared_beginning)
    from trl.trainer.dpo_trainer import DataCollatorForPreference

log = logging.getLogger(__name__)

# Drop reasons (the keys of data_stats.json's rows_dropped), beside SFT's.
EMPTY_ANSWER = "empty_chosen_or_rejected"
SAME_ANSWER = "chosen_equals_rejected"


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (system/user/assistant turns, or one raw text) and the two answers that follow it."""

    prompt: list[Message]
    chosen: str
    rejected: str
    raw: bool = False  # TRL's string pairs: tokenized as they are, without the chat template

    def conversation(self, answer: str) -> Conversation:
        """The prompt followed by `answer`, with only that answer trained (loss weights 0 on the
        prompt's own assistant turns)."""
        messages = [*self.prompt, {"role": "assistant", "content": answer}]
        if self.raw:
            return Conversation(messages, raw=True)
        weights: list[int | None] = [0 if m["role"] == "assistant" else None for m in self.prompt]
        return Conversation(messages, loss_weights=[*weights, 1])


def detect_preference_format(keys: set[str], columns: DataColumnsConfig) -> str:
    """The preference format whose columns `keys` has (the union of the first rows' keys)."""
    missing = [column for column in (columns.chosen, columns.rejected) if column not in keys]
    if missing:
        raise DataError(
            f"method=dpo needs a chosen and a rejected answer per row; no column {missing} among "
            f"{sorted(keys)}. Fix: map yours, e.g. data.columns.chosen=response_a "
            "data.columns.rejected=response_b"
        )
    # A prompt column first: some sets also carry `messages` (the chosen conversation, for SFT).
    for name, column in (
        ("preference", columns.prompt),
        ("messages", columns.messages),
        ("sharegpt", columns.conversations),
        ("alpaca", columns.instruction),
    ):
        if column in keys:
            return name
    return "preference"  # TRL's with the prompt inside chosen/rejected


def to_pair(
    row: Any, fmt: str, columns: DataColumnsConfig, role_map: Mapping[str, str]
) -> PreferencePair | Drop:
    """One source row as a preference pair, or why it cannot be used."""
    if not isinstance(row, Mapping):
        return Drop(MALFORMED, f"expected an object with columns, got {type(row).__name__}")
    for column in (columns.chosen, columns.rejected):
        if _is_empty(row.get(column)):
            return Drop(EMPTY_ANSWER, f"column {column!r} is missing or empty")
    try:
        pair = (
            _from_trl(row, columns, role_map)
            if fmt == "preference"
            else _from_prompt_format(row, fmt, columns, role_map)
        )
    except RowProblem as problem:
        return problem.drop
    if not pair.chosen.strip() or not pair.rejected.strip():  # e.g. one string is the other's beginning
        return Drop(EMPTY_ANSWER, "the chosen or the rejected answer is empty after the shared prompt")
    if pair.chosen.strip() == pair.rejected.strip():
        return Drop(SAME_ANSWER, "the chosen and the rejected answer are the same: nothing to prefer")
    return pair


def _is_empty(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return value is None or value in ([], {})


def _from_prompt_format(
    row: Mapping[str, Any], fmt: str, columns: DataColumnsConfig, role_map: Mapping[str, str]
) -> PreferencePair:
    """alpaca, messages, sharegpt: the prompt as SFT reads that format, then the two answers."""
    chosen = _answer(row[columns.chosen], columns.chosen, columns, role_map)
    rejected = _answer(row[columns.rejected], columns.rejected, columns, role_map)
    if fmt == "alpaca":  # SFT's alpaca reader wants an output: the chosen answer stands in, then goes
        parsed = to_conversation({**row, columns.output: chosen}, fmt, columns, role_map)
        prompt = parsed.messages[:-1] if isinstance(parsed, Conversation) else parsed
    else:
        column = columns.messages if fmt == "messages" else columns.conversations
        parsed = to_conversation({column: row.get(column)}, fmt, columns, role_map)
        prompt = parsed.messages if isinstance(parsed, Conversation) else parsed
    if isinstance(prompt, Drop):
        raise RowProblem(prompt.reason, prompt.detail)
    return PreferencePair(prompt, chosen, rejected)


def _from_trl(
    row: Mapping[str, Any], columns: DataColumnsConfig, role_map: Mapping[str, str]
) -> PreferencePair:
    """TRL's prompt/chosen/rejected: string pairs, message lists, or an implicit prompt."""
    chosen, rejected = row[columns.chosen], row[columns.rejected]
    prompt = None if _is_empty(row.get(columns.prompt)) else row[columns.prompt]
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:  # e.g. Anthropic HH: the dialogue so far is the strings' shared beginning
            if chosen.startswith(rejected) or rejected.startswith(chosen):
                raise RowProblem(
                    EMPTY_ANSWER, "one answer is the other's beginning: nothing of it would follow"
                )
            head, chosen, rejected = _shared_beginning(chosen, rejected)
            if not head.strip():
                raise RowProblem(
                    MISSING_FIELD,
                    f"no {columns.prompt!r} column, and {columns.chosen!r} and {columns.rejected!r} share no "
                    "beginning to take as the prompt. Fix: name your prompt column, e.g. "
                    "data.columns.prompt=question (or data.columns.instruction=question for alpaca rows)",
                )
            return PreferencePair([{"role": "user", "content": head}], chosen, rejected, raw=True)
        if isinstance(prompt, str):
            # Raw text keeps its whitespace: a completion's leading space is part of its first token.
            return PreferencePair([{"role": "user", "content": prompt}], chosen, rejected, raw=True)
    whole_c = _answer_messages(chosen, columns.chosen, columns, role_map)
    whole_r = _answer_messages(rejected, columns.rejected, columns, role_map)
    if any(m["role"] != "assistant" for m in whole_c + whole_r):  # the conversation is in the answers
        head_messages, rest_c, rest_r = _shared_beginning(whole_c, whole_r)
        pair = PreferencePair(
            head_messages, _single_answer(rest_c, columns.chosen), _single_answer(rest_r, columns.rejected)
        )
        if prompt is not None and _prompt_text(prompt, columns, role_map) != _prompt_text(
            pair.prompt, columns, role_map
        ):
            raise RowProblem(
                MALFORMED,
                f"column {columns.prompt!r} differs from the prompt that {columns.chosen!r} and "
                f"{columns.rejected!r} begin with. Fix: drop one of them from the data",
            )
        return pair
    if prompt is None:
        raise RowProblem(MISSING_FIELD, f"column {columns.prompt!r} is missing or empty")
    head_messages = _messages(prompt, columns.prompt, columns, role_map, default_role="user")
    return PreferencePair(
        head_messages, _single_answer(whole_c, columns.chosen), _single_answer(whole_r, columns.rejected)
    )


T = TypeVar("T", str, list[Message])


def _shared_beginning(chosen: T, rejected: T) -> tuple[T, T, T]:
    """The prompt the two answers share (characters or turns; TRL's `extract_prompt`) and each rest."""
    # TRL imported here and in `collator`, not at the top: only method=dpo needs it, and every run
    # imports this module (build_data_module); TRL's import (~1 s, W&B included) is an SFT run's waste.
    from trl.data_utils import extract_prompt  # noqa: PLC0415

    shared = extract_prompt({"chosen": chosen, "rejected": rejected})
    return cast(T, shared["prompt"]), cast(T, shared["chosen"]), cast(T, shared["rejected"])


def _messages(
    value: Any,
    column: str,
    columns: DataColumnsConfig,
    role_map: Mapping[str, str],
    default_role: str = "assistant",
) -> list[Message]:
    """A column as messages: a list of them, one message object, or a string (one `default_role` turn)."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value.strip()}]
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise RowProblem(MALFORMED, f"column {column!r} is a {type(value).__name__}, not text or messages")
    return [message for message, _ in parse_messages(value, columns, role_map)]


def _answer_messages(
    value: Any, column: str, columns: DataColumnsConfig, role_map: Mapping[str, str]
) -> list[Message]:
    """An answer column as messages; an empty message in it is an empty answer."""
    try:
        return _messages(value, column, columns, role_map)
    except RowProblem as problem:
        if problem.drop.reason == MISSING_FIELD:
            raise RowProblem(EMPTY_ANSWER, f"column {column!r}: {problem.drop.detail}") from problem
        raise


def _answer(value: Any, column: str, columns: DataColumnsConfig, role_map: Mapping[str, str]) -> str:
    """An answer column's text: a string, an assistant message object, or a list of one."""
    return _single_answer(_answer_messages(value, column, columns, role_map), column)


def _single_answer(messages: list[Message], column: str) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise RowProblem(
            MALFORMED,
            f"{column!r} must be one assistant answer after the prompt, got roles "
            f"{[m['role'] for m in messages]} (DPO compares two final answers to the same prompt)",
        )
    return messages[0]["content"]


def _prompt_text(value: Any, columns: DataColumnsConfig, role_map: Mapping[str, str]) -> str:
    """A prompt's user text, to compare a prompt column with the prompt inside the answers."""
    if isinstance(value, str):
        return value.strip()
    messages = _messages(value, columns.prompt, columns, role_map, default_role="user")
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


def split_pair(chosen: Encoded, rejected: Encoded) -> dict[str, list[int]] | Drop:
    """TRL's prompt_ids / chosen_ids / rejected_ids from the two masked sequences: the prompt is what
    precedes the first trained token, an answer the trained span (end of turn included)."""
    parts = []
    for encoded in (chosen, rejected):
        trained = [i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX]
        start, end = trained[0], trained[-1] + 1
        if len(trained) != end - start or start == 0:  # masking located the answer in pieces
            return Drop(TEMPLATE_INCONSISTENT, "the answer's tokens are not one span after the prompt")
        parts.append((encoded.input_ids[:start], encoded.input_ids[start:end]))
    (prompt, chosen_ids), (prompt_r, rejected_ids) = parts
    if prompt != prompt_r:
        return Drop(
            TEMPLATE_INCONSISTENT,
            "the chat template renders the prompt differently before the chosen and the rejected answer. "
            "Fix: set data.chat_template (e.g. chatml)",
        )
    return {"prompt_ids": prompt, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}


class PreferenceDataModule(DataModule):
    """`DataModule` for method=dpo: the same loading, sampling, splitting, cache and stats; rows become
    preference pairs, datasets hold TRL's prompt_ids/chosen_ids/rejected_ids, and the conversations
    kept for held-out samples are each prompt with its chosen answer (the reference)."""

    preference = True

    def _build(self, sampled: list[SourceRow]) -> CachedData:
        fmt = self.cfg.format
        if fmt == "auto":
            keys = {str(k) for row in sampled[:100] if isinstance(row.data, Mapping) for k in row.data}
            fmt = detect_preference_format(keys, self.cfg.columns)
            log.info("data.format=auto: the columns look like %s preference pairs", fmt)
        self.stats.rows_sampled = len(sampled)
        self.stats.format = fmt
        pairs: list[tuple[PreferencePair, str]] = []
        for row in sampled:
            result = to_pair(row.data, fmt, self.cfg.columns, self.cfg.role_map)
            if isinstance(result, Drop):
                self.stats.record_drop(result, row.origin)
            else:
                pairs.append((result, row.origin))
        if len(pairs) < 2:
            raise DataError(f"{len(pairs)} usable rows of {len(sampled)}: {self._drop_summary()}")
        train, val = split_rows(pairs, self.cfg.val_fraction, self.seed)
        train_rows, val_rows = self._encode_pairs(train, "train"), self._encode_pairs(val, "validation")
        self.stats.train_rows, self.stats.val_rows = len(train_rows), len(val_rows)
        # Both sequences of each pair, in order: the model runs over each (and pads them together).
        self.stats.lengths = [
            len(row["prompt_ids"]) + len(row[side])
            for row in train_rows
            for side in ("chosen_ids", "rejected_ids")
        ]
        self.stats.target_tokens = sum(
            len(row["chosen_ids"]) + len(row["rejected_ids"]) for row in train_rows
        )
        self.stats.batch_rows = len(train_rows)
        # TRL's collator puts a batch's chosen and rejected sequences in one padded tensor.
        self.stats.token_slots = token_slots(self.stats.lengths, "none", 2 * self.batch_size)
        return CachedData(
            train=Dataset.from_list(train_rows),
            val=Dataset.from_list(val_rows),
            stats=self.stats.as_fields(),
            train_conversations=[pair.conversation(pair.chosen) for pair, _ in train],
            val_conversations=[pair.conversation(pair.chosen) for pair, _ in val],
        )

    def _encode_pairs(
        self, pairs: list[tuple[PreferencePair, str]], split: str
    ) -> list[dict[str, list[int]]]:
        """Each pair's two conversations tokenized and masked as SFT's are; the pair is dropped (counted
        once, by the first side's reason) when either side is."""
        conversations = [
            pair.conversation(answer) for pair, _ in pairs for answer in (pair.chosen, pair.rejected)
        ]
        encoded = encode_conversations(
            conversations, self.tokenizer, self.cfg.max_length, self.cfg.overlength, train_on_prompt=False
        )
        kept = []
        for index, (_, origin) in enumerate(pairs):
            chosen, rejected = encoded[2 * index], encoded[2 * index + 1]
            if isinstance(chosen, Drop) or isinstance(rejected, Drop):
                side, drop = ("chosen", chosen) if isinstance(chosen, Drop) else ("rejected", rejected)
                assert isinstance(drop, Drop)
                self.record_drop(Drop(drop.reason, f"{side} answer: {drop.detail}"), origin)
                continue
            row = split_pair(chosen, rejected)
            if isinstance(row, Drop):
                self.record_drop(row, origin)
                continue
            self.stats.truncated += chosen.truncated or rejected.truncated
            kept.append(row)
        if not kept:
            raise DataError(f"no usable {split} pairs: {self._drop_summary()}")
        return kept

    def collator(self) -> DataCollatorForPreference:  # type: ignore[override]
        """TRL's preference collator: chosen then rejected sequences, padded to the batch's longest."""
        from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: PLC0415  (see _shared_beginning)

        return DataCollatorForPreference(pad_token_id=self.tokenizer.pad_token_id)


def build_data_module(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> DataModule:
    """The data module the configured method trains on (SFT's, or preference pairs)."""
    module = PreferenceDataModule if cfg.method.preference else DataModule
    return module(cfg.data, tokenizer, cfg.seed, cfg.trainer.per_device_train_batch_size)
