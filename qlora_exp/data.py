"""DataModule: load -> normalise to messages -> sample(seed) -> split(seed) -> render with the
chat template -> tokenize and mask prompt tokens -> length policy -> stats.

Masking is ours rather than TRL's: SFTTrainer's assistant-only loss needs `{% generation %}`
markers that the real Gemma / Llama / Mistral / Qwen templates do not have. We mask by rendering
each conversation prefix with the tokenizer's own template, which is exact for any template
whose renderings of successive turns are token prefixes of each other (checked per example).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from qlora_exp.errors import DataError
from qlora_exp.schema import DataConfig
from qlora_exp.synthetic_data import generate_synthetic_examples

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
Message = dict[str, str]


@dataclass
class DataStats:
    """What happened to the rows: read, kept, dropped (by reason), token lengths."""

    rows_read: int = 0
    rows_sampled: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    train_rows: int = 0
    val_rows: int = 0
    lengths: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary with length percentiles."""
        lengths = np.asarray(self.lengths or [0])
        return {
            "rows_read": self.rows_read,
            "rows_sampled": self.rows_sampled,
            "rows_kept": self.train_rows + self.val_rows,
            "rows_dropped": dict(self.dropped),
            "train_rows": self.train_rows,
            "val_rows": self.val_rows,
            "train_tokens": int(lengths.sum()) if self.lengths else 0,
            "length": {
                "min": int(lengths.min()),
                "mean": float(lengths.mean()),
                "p50": float(np.percentile(lengths, 50)),
                "p90": float(np.percentile(lengths, 90)),
                "p99": float(np.percentile(lengths, 99)),
                "max": int(lengths.max()),
            },
        }


def load_rows(cfg: DataConfig, seed: int) -> list[dict[str, Any]]:
    """Rows in alpaca form from the configured source."""
    if cfg.source == "synthetic":
        return generate_synthetic_examples(
            cfg.synthetic_size, seed=seed, zh_fraction=cfg.synthetic_zh_fraction
        )
    path = Path(str(cfg.path)).expanduser()
    if not path.is_file():
        raise DataError(f"data.path: file not found: {path}. Fix: pass an existing .json or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"data.path: {path} is not UTF-8 ({exc}). Fix: re-save the file as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"data.path: cannot read {path}: {exc}") from exc
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{number}: invalid JSON ({exc.msg}). Fix: one object per line"
                ) from exc
        return rows
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from exc
    if not isinstance(loaded, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(loaded).__name__}")
    return loaded


def alpaca_to_messages(row: dict[str, Any]) -> list[Message] | None:
    """One alpaca row as a user/assistant conversation; None when a required field is empty."""
    instruction = str(row.get("instruction") or "").strip()
    extra = str(row.get("input") or "").strip()
    output = str(row.get("output") or "").strip()
    if not instruction or not output:
        return None
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if row.get("system"):
        messages.insert(0, {"role": "system", "content": str(row["system"])})
    return messages


def sample_rows(rows: list[Any], sample_size: int | None, seed: int) -> list[Any]:
    """`sample_size` rows drawn with `seed` (all rows, in order, when None or not fewer)."""
    if sample_size is None or sample_size >= len(rows):
        return list(rows)
    return random.Random(seed).sample(rows, sample_size)


def split_rows(rows: list[Any], val_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Seeded train/validation split; both sides get at least one row."""
    if len(rows) < 2:
        raise DataError(f"need at least 2 usable rows to split into train and validation, got {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed + 1).shuffle(order)
    n_val = min(max(1, round(len(rows) * val_fraction)), len(rows) - 1)
    val = [rows[i] for i in order[:n_val]]
    train = [rows[i] for i in order[n_val:]]
    return train, val


def _render_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation_prompt: bool
) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=True
    )
    return list(encoded["input_ids"])  # type: ignore[call-overload,arg-type,index]


def tokenize_conversation(
    messages: list[Message], tokenizer: PreTrainedTokenizerBase, train_on_prompt: bool = False
) -> dict[str, list[int]]:
    """Token ids of the rendered conversation, with labels = ids on assistant turns, -100 elsewhere."""
    input_ids = _render_ids(tokenizer, messages, generation_prompt=False)
    labels = list(input_ids) if train_on_prompt else [IGNORE_INDEX] * len(input_ids)
    if not train_on_prompt:
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = _render_ids(tokenizer, messages[:turn], generation_prompt=True)
            upto = _render_ids(tokenizer, messages[: turn + 1], generation_prompt=False)
            if input_ids[: len(upto)] != upto or upto[: len(prompt)] != prompt:
                raise DataError(
                    "the chat template renders turns inconsistently (a turn's tokens are not a prefix "
                    "of the whole conversation), so prompt masking would be wrong. "
                    "Fix: set data.chat_template to a prefix-consistent template"
                )
            labels[len(prompt) : len(upto)] = input_ids[len(prompt) : len(upto)]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def fingerprint_rows(rows: list[Any]) -> str:
    """sha256 of the rows as canonical JSON: the data's identity in provenance."""
    payload = json.dumps(rows, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()


class DataModule:
    """Builds tokenized train/validation datasets and the batch collator from `DataConfig`."""

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.seed = seed
        self.stats = DataStats()
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.val_conversations: list[list[Message]] = []
        self.fingerprint = ""

    def setup(self) -> None:
        """Load, sample, split and tokenize; raises DataError when nothing usable remains."""
        if self.cfg.chat_template:
            self.tokenizer.chat_template = self.cfg.chat_template
        if not self.tokenizer.chat_template:
            raise DataError(
                "the tokenizer has no chat template. Fix: set data.chat_template to a Jinja template"
            )
        rows = load_rows(self.cfg, self.seed)
        self.stats.rows_read = len(rows)
        sampled = sample_rows(rows, self.cfg.sample_size, self.seed)
        self.stats.rows_sampled = len(sampled)
        self.fingerprint = fingerprint_rows(sampled)
        conversations = []
        for row in sampled:
            messages = alpaca_to_messages(row) if isinstance(row, dict) else None
            if messages is None:
                self.stats.dropped["missing_or_empty_field"] += 1
                continue
            conversations.append(messages)
        train, val = split_rows(conversations, self.cfg.val_fraction, self.seed)
        self.train_dataset = self._tokenize(train, "train")
        self.val_dataset = self._tokenize(val, "validation")
        self.val_conversations = val
        self.stats.train_rows, self.stats.val_rows = len(self.train_dataset), len(self.val_dataset)
        log.info(
            "data: %d rows read, %d sampled, %d train, %d validation, dropped %s",
            self.stats.rows_read,
            self.stats.rows_sampled,
            self.stats.train_rows,
            self.stats.val_rows,
            dict(self.stats.dropped) or "none",
        )

    def _tokenize(self, conversations: list[list[Message]], split: str) -> Dataset:
        features: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for messages in conversations:
            encoded = tokenize_conversation(messages, self.tokenizer, self.cfg.train_on_prompt)
            if len(encoded["input_ids"]) > self.cfg.max_length:
                self.stats.dropped["over_max_length"] += 1
                continue
            if all(label == IGNORE_INDEX for label in encoded["labels"]):
                self.stats.dropped["no_trainable_tokens"] += 1
                continue
            for key, value in encoded.items():
                features[key].append(value)
            if split == "train":
                self.stats.lengths.append(len(encoded["input_ids"]))
        if not features["input_ids"]:
            raise DataError(
                f"no usable {split} rows: dropped {dict(self.stats.dropped)}. "
                "Fix: raise data.max_length, or check the data's fields"
            )
        return Dataset.from_dict(features)

    def collator(self) -> DataCollatorForSeq2Seq:
        """Pads each batch to its own longest row (never to max_length); pad labels are -100."""
        return DataCollatorForSeq2Seq(
            self.tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX, return_tensors="pt"
        )
