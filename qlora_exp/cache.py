"""The project's cache directory: embedded checkpoints and tokenized datasets live under it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where built checkpoints and tokenized datasets live: $QLORA_EXP_CACHE, else ~/.cache/qlora_exp."""
    return Path(os.environ.get("QLORA_EXP_CACHE", Path.home() / ".cache" / "qlora_exp")).expanduser()
