"""Tokenized datasets cached under a fingerprint, so a second run or another job of a sweep skips
rendering and tokenizing.

The key covers everything the tokenized result depends on: the sampled rows themselves, the data
config, the seed (sampling and split), the tokenizer (its full serialised form and special tokens),
the chat template in use and the batch size the padding estimate uses. Entries are written to a
temporary directory and renamed into place, so concurrent sweep jobs never read half an entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, load_from_disk
from transformers import PreTrainedTokenizerBase

from qlora_exp.cache import cache_root, content_key
from qlora_exp.data.formats import Conversation

log = logging.getLogger(__name__)

# Bump when tokenization, masking or packing output changes, so old entries are not reused.
CACHE_VERSION = 2


@dataclass
class CachedData:
    """One cache entry: the datasets, the stats they came with, and the split's conversations."""

    train: Dataset
    val: Dataset
    stats: dict[str, Any]
    train_conversations: list[Conversation]
    val_conversations: list[Conversation]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's full serialised form (fast tokenizers) or vocabulary, plus special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{special}\n{body}".encode()).hexdigest()


def cache_key(**parts: Any) -> str:
    """sha256 of the parts as canonical JSON, with the cache version."""
    return content_key(version=CACHE_VERSION, **parts)


def entry_dir(key: str) -> Path:
    """Where the entry for `key` lives: $QLORA_EXP_CACHE/data/KEY."""
    return cache_root() / "data" / key


def load_entry(key: str) -> CachedData | None:
    """The cached entry, or None when there is none (or it is unreadable: then it is rebuilt)."""
    path = entry_dir(key)
    if not (path / "meta.json").is_file():
        return None
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        return CachedData(
            train=load_from_disk(str(path / "train")),
            val=load_from_disk(str(path / "val")),
            stats=meta["stats"],
            train_conversations=[Conversation(**c) for c in meta["train_conversations"]],
            val_conversations=[Conversation(**c) for c in meta["val_conversations"]],
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("data cache entry %s is unreadable (%s); rebuilding it", path, exc)
        return None


def save_entry(key: str, entry: CachedData) -> None:
    """Write the entry atomically; a concurrent writer that got there first wins."""
    target = entry_dir(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=target.parent))
    try:
        entry.train.save_to_disk(str(tmp / "train"))
        entry.val.save_to_disk(str(tmp / "val"))
        meta = {
            "stats": entry.stats,
            "train_conversations": [c.__dict__ for c in entry.train_conversations],
            "val_conversations": [c.__dict__ for c in entry.val_conversations],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        os.rename(tmp, target)
        log.info("data: tokenized datasets cached in %s", target)
    except OSError as exc:  # target written meanwhile by another job, or the disk is full: not fatal
        log.info("data: not caching tokenized datasets (%s)", exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
