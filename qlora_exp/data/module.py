"""DataModule: load -> normalise to conversations -> sample(seed) -> split(seed) -> render with the
chat template -> tokenize and mask prompt tokens -> length policy -> pack or pad -> stats.

Each step lives in its own module: `data_sources` (files, directories, hub), `data_formats` (the
formats users bring), `tokenization` (templates, masking, length), `packing` (collators, bins).
Rows that cannot be used are dropped by reason, counted in `DataStats`, and the first few of each
reason are logged with their file and line; nothing usable at all is a DataError that says why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from qlora_exp.data.cache import CachedData, cache_key, load_entry, save_entry, tokenizer_fingerprint
from qlora_exp.data.formats import (
    Conversation,
    Drop,
    alpaca_to_messages,
    detect_format,
    to_conversation,
)
from qlora_exp.data.packing import FlatteningCollator, build_collator, pack_examples, token_slots
from qlora_exp.data.sources import SourceRow, load_rows
from qlora_exp.data.tokenization import (
    IGNORE_INDEX,
    OVER_LENGTH,
    Encoded,
    encode_conversations,
    resolve_chat_template,
    tokenize_conversation,
)
from qlora_exp.errors import DataError
from qlora_exp.schema import DataConfig, to_plain_dict

log = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "DataModule",
    "DataStats",
    "alpaca_to_messages",
    "fingerprint_rows",
    "sample_rows",
    "split_rows",
    "tokenize_conversation",
]
DROP_EXAMPLES_SHOWN = 3


@dataclass
class DataStats:
    """What happened to the rows: read, kept, dropped (by reason, with examples), lengths, packing."""

    rows_read: int = 0
    rows_sampled: int = 0
    format: str = ""
    dropped: Counter[str] = field(default_factory=Counter)
    drop_examples: dict[str, list[str]] = field(default_factory=dict)
    truncated: int = 0
    train_rows: int = 0
    val_rows: int = 0
    lengths: list[int] = field(default_factory=list)  # train examples' token counts, in dataset order
    target_tokens: int = 0  # train tokens with a label (what the loss is taken over)
    packing: str = "none"
    batch_rows: int = 0  # rows the train loader draws from: examples, or packed bins
    token_slots: int = 0  # token positions the model computes over in one epoch
    bin_capacity: int = 0  # packed: tokens a bin holds (data.max_length)
    cache_hit: bool = False
    prepare_seconds: float = 0.0

    def as_fields(self) -> dict[str, Any]:
        """The fields as JSON-safe values, for the cache (`dataclasses.asdict` mangles a Counter)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**values, "dropped": dict(self.dropped)}

    @classmethod
    def from_fields(cls, values: dict[str, Any]) -> DataStats:
        """Rebuild from `as_fields` output."""
        return cls(**{**values, "dropped": Counter(values["dropped"])})

    def record_drop(self, drop: Drop, origin: str) -> None:
        """Count a dropped row; keep the first few for the log."""
        self.dropped[drop.reason] += 1
        examples = self.drop_examples.setdefault(drop.reason, [])
        if len(examples) < DROP_EXAMPLES_SHOWN:
            examples.append(f"{origin}: {drop.detail}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary with length percentiles and packing efficiency."""
        lengths = np.asarray(self.lengths or [0])
        real = int(lengths.sum()) if self.lengths else 0
        return {
            "rows_read": self.rows_read,
            "rows_sampled": self.rows_sampled,
            "format": self.format,
            "rows_kept": self.train_rows + self.val_rows,
            "rows_dropped": dict(self.dropped),
            "rows_dropped_examples": {k: list(v) for k, v in self.drop_examples.items()},
            "rows_truncated": self.truncated,
            "cache_hit": self.cache_hit,
            "prepare_seconds": round(self.prepare_seconds, 3),
            "train_rows": self.train_rows,
            "val_rows": self.val_rows,
            "train_tokens": real,
            "train_target_tokens": self.target_tokens,
            "length": {
                "min": int(lengths.min()),
                "mean": float(lengths.mean()),
                **{f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 95, 99)},
                "max": int(lengths.max()),
            },
            "packing": {
                "mode": self.packing,
                "batch_rows": self.batch_rows,
                "token_slots": self.token_slots,
                "efficiency": real / self.token_slots if self.token_slots else 0.0,
                **({"bin_fill": real / (self.batch_rows * self.bin_capacity)} if self.bin_capacity else {}),
            },
        }


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


def fingerprint_rows(rows: list[Any]) -> str:
    """sha256 of the rows as canonical JSON: the data's identity in provenance."""
    payload = json.dumps(rows, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()


class DataModule:
    """Builds tokenized train/validation datasets and the batch collator from `DataConfig`."""

    preference = False  # chosen/rejected pairs instead (PreferenceDataModule, data/preference.py)

    def __init__(
        self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, batch_size: int = 1
    ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.seed = seed
        self.batch_size = batch_size  # only for the padding estimate in the stats
        self.stats = DataStats(packing=cfg.packing)
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.train_conversations: list[Conversation] = []
        self.val_conversations: list[Conversation] = []
        self.fingerprint = ""
        self.cache_key = ""  # what the tokenized result depends on (data/cache.py), set by setup()

    def setup(self) -> None:
        """Load, normalise, sample, split, tokenize and pack (or reuse the cached result of that)."""
        started = time.perf_counter()
        template = resolve_chat_template(self.tokenizer, self.cfg.chat_template)
        rows = load_rows(self.cfg, self.seed, preference=self.preference)
        sampled = sample_rows(rows, self.cfg.sample_size, self.seed)
        self.fingerprint = fingerprint_rows([row.data for row in sampled])
        key = cache_key(
            rows=self.fingerprint,
            data={k: v for k, v in to_plain_dict(self.cfg).items() if k != "cache"},
            seed=self.seed,
            tokenizer=tokenizer_fingerprint(self.tokenizer),
            template=template,
            batch_size=self.batch_size,
            preference=self.preference,
        )
        self.cache_key = key
        entry = load_entry(key) if self.cfg.cache else None
        cache_hit = entry is not None
        if entry is None:
            self.stats.rows_read = len(rows)
            entry = self._build(sampled)
            if self.cfg.cache:
                save_entry(key, entry)
        self.train_dataset, self.val_dataset = entry.train, entry.val
        self.stats = DataStats.from_fields(entry.stats)
        self.train_conversations = entry.train_conversations
        self.val_conversations = entry.val_conversations
        self.stats.cache_hit = cache_hit
        self.stats.prepare_seconds = time.perf_counter() - started
        self._log_summary()

    def _build(self, sampled: list[SourceRow]) -> CachedData:
        fmt = self.cfg.format
        if fmt == "auto":
            fmt = detect_format((row.data for row in sampled), self.cfg.columns)
            log.info("data.format=auto: the columns look like %s (set data.format to override)", fmt)
        self.stats.rows_sampled = len(sampled)
        self.stats.format = fmt
        conversations: list[tuple[Conversation, str]] = []
        for row in sampled:
            result = to_conversation(row.data, fmt, self.cfg.columns, self.cfg.role_map)
            if isinstance(result, Drop):
                self.stats.record_drop(result, row.origin)
            else:
                conversations.append((result, row.origin))
        if len(conversations) < 2:
            raise DataError(f"{len(conversations)} usable rows of {len(sampled)}: {self._drop_summary()}")
        train, val = split_rows(conversations, self.cfg.val_fraction, self.seed)
        train_encoded = self._encode(train, "train")
        val_encoded = self._encode(val, "validation")
        self.stats.train_rows, self.stats.val_rows = len(train_encoded), len(val_encoded)
        self.stats.lengths = [len(e.input_ids) for e in train_encoded]
        # labels[0] is never a target (shifted away); list.count keeps this off the per-token Python path.
        self.stats.target_tokens = sum(
            len(e.labels) - 1 - e.labels[1:].count(IGNORE_INDEX) for e in train_encoded
        )
        train_dataset = self._dataset(train_encoded)
        self.stats.batch_rows = len(train_dataset)
        self.stats.bin_capacity = self.cfg.max_length if self.cfg.packing == "packed" else 0
        self.stats.token_slots = token_slots(self.stats.lengths, self.cfg.packing, self.batch_size)
        return CachedData(
            train=train_dataset,
            val=self._dataset(val_encoded),
            stats=self.stats.as_fields(),
            train_conversations=[conversation for conversation, _ in train],
            val_conversations=[conversation for conversation, _ in val],
        )

    def collator(self) -> DataCollatorForSeq2Seq | FlatteningCollator:
        """Pads each batch to its own longest row (packing=none), or flattens it (padding_free, packed)."""
        return build_collator(self.cfg.packing, self.tokenizer)

    def _encode(self, conversations: list[tuple[Conversation, str]], split: str) -> list[Encoded]:
        kept = []
        results = encode_conversations(
            [conversation for conversation, _ in conversations],
            self.tokenizer,
            self.cfg.max_length,
            self.cfg.overlength,
            self.cfg.train_on_prompt,
        )
        for (_, origin), result in zip(conversations, results, strict=True):
            if isinstance(result, Drop):
                self.record_drop(result, origin)
                continue
            self.stats.truncated += result.truncated
            kept.append(result)
        if not kept:
            raise DataError(f"no usable {split} rows: {self._drop_summary()}")
        return kept

    def record_drop(self, drop: Drop, origin: str) -> None:
        """Count a row the tokenization could not use; over-length under data.overlength=error raises."""
        if drop.reason == OVER_LENGTH and self.cfg.overlength == "error":
            raise DataError(
                f"{origin}: {drop.detail}. Fix: raise data.max_length, or set "
                "data.overlength=drop or data.overlength=truncate"
            )
        self.stats.record_drop(drop, origin)

    def _dataset(self, encoded: list[Encoded]) -> Dataset:
        dataset = Dataset.from_dict(
            {
                "input_ids": [e.input_ids for e in encoded],
                "attention_mask": [[1] * len(e.input_ids) for e in encoded],
                "labels": [e.labels for e in encoded],
            }
        )
        return pack_examples(dataset, self.cfg.max_length) if self.cfg.packing == "packed" else dataset

    def _drop_summary(self) -> str:
        if not self.stats.dropped:
            return "no rows were dropped; the source has too few rows"
        shown = "; ".join(
            f"{reason} x{count} (e.g. {self.stats.drop_examples[reason][0]})"
            for reason, count in self.stats.dropped.most_common()
        )
        return (
            f"dropped {shown}. Fix: check the data's fields, data.format and data.columns.*, data.max_length"
        )

    def _log_summary(self) -> None:
        stats = self.stats.to_dict()
        log.info(
            "data: %d rows read, %d sampled, format %s, %d train, %d validation, %d truncated; "
            "train length p50 %.0f p99 %.0f max %d; packing %s, efficiency %.3f; prepared in %.2f s%s",
            stats["rows_read"],
            stats["rows_sampled"],
            stats["format"],
            stats["train_rows"],
            stats["val_rows"],
            stats["rows_truncated"],
            stats["length"]["p50"],
            stats["length"]["p99"],
            stats["length"]["max"],
            self.cfg.packing,
            stats["packing"]["efficiency"],
            self.stats.prepare_seconds,
            " (cached tokenization)" if self.stats.cache_hit else "",
        )
        for reason, count in self.stats.dropped.most_common():
            log.warning("data: dropped %d rows (%s), e.g.:", count, reason)
            for example in self.stats.drop_examples[reason]:
                log.warning("  %s", example)
