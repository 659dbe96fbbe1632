"""Where rows come from: the built-in synthetic set, local files or directories, or a hub dataset.

Local JSON, JSONL and CSV files are decoded here rather than through `datasets.load_dataset`, whose
errors name neither the file nor the line: a user with one bad line in a million-row file needs both.
Parquet is binary and read with pyarrow. Hub datasets go through `datasets.load_dataset`, which
caches and verifies them itself.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import load_dataset
from datasets.exceptions import DatasetNotFoundError

from qlora_exp.data.synthetic import generate_synthetic_examples, generate_synthetic_preferences
from qlora_exp.errors import DataError
from qlora_exp.schema import DataConfig

log = logging.getLogger(__name__)

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


@dataclass(frozen=True)
class SourceRow:
    """One row as read, and where it came from (file:line), for messages about it."""

    data: Any
    origin: str


def load_rows(cfg: DataConfig, seed: int, preference: bool = False) -> list[SourceRow]:
    """Every row of the configured source, in source order; the synthetic source gives preference
    pairs (chosen and rejected answers) when `preference` is set."""
    if cfg.source == "synthetic":
        generate = generate_synthetic_preferences if preference else generate_synthetic_examples
        rows = generate(cfg.synthetic_size, seed=seed, zh_fraction=cfg.synthetic_zh_fraction)
        return [SourceRow(row, f"synthetic#{i}") for i, row in enumerate(rows)]
    if cfg.source == "hub":
        return load_hub_rows(str(cfg.hub_id), cfg.hub_config, cfg.split, cfg.revision)
    return load_local_rows(Path(str(cfg.path)).expanduser())


def load_local_rows(path: Path) -> list[SourceRow]:
    """Rows of one file, or of every supported file in a directory (sorted, recursive)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(
                f"data.path: directory {path} holds no {', '.join(SUFFIXES)} files. "
                "Fix: point data.path at a directory of data files or at one file"
            )
        log.info("data: reading %d files from %s", len(files), path)
        return [row for file in files for row in read_file_rows(file)]
    if not path.exists():
        raise DataError(f"data.path: file not found: {path}. Fix: pass an existing file or directory")
    return read_file_rows(path)


def read_file_rows(path: Path) -> list[SourceRow]:
    """Rows of one .json / .jsonl / .csv / .parquet file."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(
            f"data.path: {path} has an unsupported extension. Fix: use one of {', '.join(SUFFIXES)}"
        )
    if suffix == ".parquet":
        return _read_parquet(path)
    text = read_utf8(path)
    if suffix == ".jsonl":
        return _parse_jsonl(text, path)
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        # The header is line 1; DictReader's line_num is the last physical line of a row (quoted newlines).
        return [SourceRow(dict(row), f"{path}:{reader.line_num}") for row in reader]
    return _parse_json(text, path)


def read_utf8(path: Path) -> str:
    """The file's text; a non-UTF-8 byte is reported with its line number."""
    try:
        raw = path.read_bytes()
    except OSError as exc:  # permission denied, a directory, an I/O error
        raise DataError(
            f"data.path: cannot read {path}: {exc.strerror or exc}. Fix: check the file's permissions"
        ) from exc
    try:
        return raw.decode("utf-8-sig")  # tolerate a UTF-8 byte-order mark
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}). "
            "Fix: re-save the file as UTF-8 (e.g. iconv -f GBK -t UTF-8)"
        ) from exc


def _parse_jsonl(text: str, path: Path) -> list[SourceRow]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(SourceRow(json.loads(line), f"{path}:{number}"))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{number}: invalid JSON ({exc.msg}). Fix: one JSON object per line"
            ) from exc
    return rows


def _parse_json(text: str, path: Path) -> list[SourceRow]:
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (one object per line? name the file .jsonl)" if exc.msg == "Extra data" else ""
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}){hint}") from exc
    if isinstance(loaded, dict):  # {"data": [...]} / {"train": [...]}: one list-valued key
        lists = [value for value in loaded.values() if isinstance(value, list)]
        if len(lists) == 1:
            loaded = lists[0]
    if not isinstance(loaded, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(loaded).__name__}")
    return [SourceRow(row, f"{path}#{i}") for i, row in enumerate(loaded)]


def _read_parquet(path: Path) -> list[SourceRow]:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read as Parquet: {exc}. Fix: check the file is complete") from exc
    return [SourceRow(row, f"{path}#{i}") for i, row in enumerate(table.to_pylist())]


def load_hub_rows(hub_id: str, config_name: str | None, split: str, revision: str | None) -> list[SourceRow]:
    """Rows of a hub dataset split (downloaded and cached by `datasets`)."""
    try:
        dataset = load_dataset(hub_id, name=config_name, split=split, revision=revision)
    except DatasetNotFoundError as exc:
        raise DataError(
            f"data.hub_id: {hub_id} not found or not reachable ({exc}). Fix: check the id, "
            "log in for gated data (hf auth login), or download it and use data.source=local"
        ) from exc
    except (ConnectionError, OSError) as exc:
        raise DataError(
            f"data.hub_id: cannot fetch {hub_id}: {exc}. Fix: check the network and the id; offline, "
            "download the files and use data.source=local data.path=DIR"
        ) from exc
    except ValueError as exc:  # unknown split or configuration name
        raise DataError(f"data.split / data.hub_config for {hub_id}: {exc}") from exc
    return [SourceRow(row, f"{hub_id}[{split}]#{i}") for i, row in enumerate(dataset)]
