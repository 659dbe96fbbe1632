"""The DataModule end to end on a user's file: drops counted by reason and shown, length policy,
packing statistics, and an error that says why when nothing usable remains."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from qlora_exp.data.module import DataModule
from qlora_exp.embedded import resolve_embedded
from qlora_exp.errors import DataError
from qlora_exp.schema import DataColumnsConfig, DataConfig


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_embedded("embedded:tiny-gemma2"))


def _sharegpt(question: str, answer: str) -> dict:
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def _module(path: Path, tokenizer: PreTrainedTokenizerBase, **overrides: object) -> DataModule:
    settings: dict = {"val_fraction": 0.25, "max_length": 64, "cache": False, **overrides}
    cfg = DataConfig(source="local", path=str(path), **settings)
    data = DataModule(cfg, tokenizer, seed=0, batch_size=2)
    data.setup()
    return data


def test_bad_rows_are_counted_by_reason_and_the_first_ones_logged(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture
) -> None:
    good = [_sharegpt(f"What is {i} + {i}?", str(2 * i)) for i in range(8)]
    bad = [
        _sharegpt("", "empty question"),
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "observation", "value": "18C"}]},
        _sharegpt("Tell me everything. " * 20, "ok"),
        {"conversations": [{"from": "human", "value": "no answer"}]},
    ]
    path = _write_jsonl(tmp_path / "chat.jsonl", good + bad)
    with caplog.at_level(logging.INFO):
        data = _module(path, tokenizer)
    stats = data.stats.to_dict()
    assert stats["format"] == "sharegpt" and "look like sharegpt" in caplog.text
    assert stats["rows_dropped"] == {
        "missing_or_empty_field": 1,
        "unmappable_role": 1,
        "over_max_length": 1,
        "no_trainable_tokens": 1,
    }
    assert stats["rows_kept"] == 8 and stats["rows_read"] == 12
    assert "chat.jsonl:10: message 1 has role 'observation'" in caplog.text
    assert stats["rows_dropped_examples"]["missing_or_empty_field"] == [
        f"{path}:9: message 0 (human) is empty"
    ]


def test_overlength_error_names_the_row_and_the_fix(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    rows = [_sharegpt(f"What is {i} + {i}?", str(2 * i)) for i in range(4)] + [_sharegpt("Long. " * 40, "ok")]
    path = _write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(DataError, match=r"long\.jsonl:5: \d+ tokens > data.max_length=64.*data.overlength"):
        _module(path, tokenizer, overlength="error")
    longer = _module(path, tokenizer, overlength="error", max_length=512)
    assert longer.stats.rows_sampled == 5 and not longer.stats.dropped


def test_truncate_keeps_the_row_cut_to_max_length(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [_sharegpt(f"What is {i} + {i}?", "Two. " * 30) for i in range(6)]
    data = _module(_write_jsonl(tmp_path / "t.jsonl", rows), tokenizer, overlength="truncate")
    assert data.stats.truncated == 6 and max(data.stats.lengths) == 64


def test_zero_usable_rows_is_an_error_that_says_why(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    path = _write_jsonl(tmp_path / "empty.jsonl", [{"instruction": "x", "output": ""}] * 5)
    with pytest.raises(
        DataError, match=r"0 usable rows of 5: dropped missing_or_empty_field x5 \(e\.g\. .*empty\.jsonl:1"
    ):
        _module(path, tokenizer)


def test_csv_with_mapped_columns_and_packing_stats(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    lines = ["question,answer"] + [f"What is {i} + {i}?,{2 * i}" for i in range(12)]
    path = tmp_path / "qa.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    columns = DataColumnsConfig(instruction="question", output="answer")
    data = _module(path, tokenizer, columns=columns, packing="packed")
    stats = data.stats.to_dict()
    assert stats["format"] == "alpaca" and stats["train_rows"] == 9
    assert data.train_dataset is not None and "seq_lengths" in data.train_dataset.column_names
    assert stats["packing"]["batch_rows"] == len(data.train_dataset) < 9
    assert stats["packing"]["efficiency"] == 1.0
    assert 0 < stats["packing"]["bin_fill"] <= 1
    assert stats["train_tokens"] == sum(data.stats.lengths)
    padded = _module(path, tokenizer, columns=columns).stats.to_dict()["packing"]
    assert padded["mode"] == "none" and 0 < padded["efficiency"] <= 1


def test_tokenized_data_is_cached_under_a_fingerprint(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QLORA_EXP_CACHE", str(tmp_path / "cache"))
    rows = [_sharegpt(f"What is {i} + {i}?", str(2 * i)) for i in range(12)] + [_sharegpt("", "x")]
    path = _write_jsonl(tmp_path / "c.jsonl", rows)
    first = _module(path, tokenizer, cache=True)
    second = _module(path, tokenizer, cache=True)
    assert not first.stats.cache_hit and second.stats.cache_hit
    assert first.train_dataset is not None and second.train_dataset is not None
    assert first.train_dataset["labels"] == second.train_dataset["labels"]
    assert first.val_conversations == second.val_conversations
    assert second.stats.to_dict()["rows_dropped"] == {"missing_or_empty_field": 1}
    # Anything the tokens depend on is in the key: another template, or changed data, is a miss.
    assert not _module(path, tokenizer, cache=True, chat_template="chatml").stats.cache_hit
    _write_jsonl(path, rows[:-1])
    assert not _module(path, tokenizer, cache=True).stats.cache_hit
