"""Local files of every supported kind, directories, and the errors a user's file can cause."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qlora_exp.data.sources import load_hub_rows, load_local_rows
from qlora_exp.errors import DataError

ROWS = [
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Say 你好.", "input": "", "output": "你好"},
]


def _write(path: Path, kind: str) -> Path:
    if kind == "json":
        path.write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n\n", encoding="utf-8")
    elif kind == "csv":
        path.write_text("instruction,input,output\nSay hi.,,hi\nSay 你好.,,你好\n", encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet"])
def test_each_file_kind_reads_the_same_rows(tmp_path: Path, kind: str) -> None:
    rows = load_local_rows(_write(tmp_path / f"data.{kind}", kind))
    assert [row.data for row in rows] == ROWS
    assert str(tmp_path / f"data.{kind}") in rows[1].origin


def test_jsonl_and_csv_rows_know_their_line(tmp_path: Path) -> None:
    assert load_local_rows(_write(tmp_path / "d.jsonl", "jsonl"))[1].origin.endswith("d.jsonl:2")
    assert load_local_rows(_write(tmp_path / "d.csv", "csv"))[1].origin.endswith("d.csv:3")


def test_a_json_object_holding_one_list_is_read_as_that_list(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"version": 1, "data": ROWS}), encoding="utf-8")
    assert [row.data for row in load_local_rows(path)] == ROWS


def test_a_directory_reads_every_supported_file_in_order(tmp_path: Path) -> None:
    _write(tmp_path / "a.jsonl", "jsonl")
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "b.parquet", "parquet")
    (tmp_path / "notes.txt").write_text("ignored", encoding="utf-8")
    rows = load_local_rows(tmp_path)
    assert [row.data for row in rows] == ROWS + ROWS
    assert rows[0].origin.endswith("a.jsonl:1") and "b.parquet" in rows[2].origin


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"file not found: .*nope\.jsonl"):
        load_local_rows(tmp_path / "nope.jsonl")


def test_empty_directory_says_what_it_needs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"holds no \.json, \.jsonl, \.csv, \.parquet files"):
        load_local_rows(tmp_path)


def test_unreadable_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "locked.jsonl", "jsonl")

    def deny(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    # Tests may run as root, which chmod cannot lock out; the OS error is what a user would get.
    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(DataError, match=r"cannot read .*locked\.jsonl: Permission denied"):
        load_local_rows(path)


def test_non_utf8_line_is_reported_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "gbk.jsonl"
    good = json.dumps(ROWS[0]).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + '{"instruction": "你好"}'.encode("gbk") + b"\n")
    with pytest.raises(DataError, match=r"gbk\.jsonl:3: not valid UTF-8.*re-save the file as UTF-8"):
        load_local_rows(path)


def test_invalid_json_line_is_reported_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl:2: invalid JSON"):
        load_local_rows(path)


def test_truncated_parquet_is_reported(tmp_path: Path) -> None:
    path = _write(tmp_path / "cut.parquet", "parquet")
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match=r"cut\.parquet: cannot read as Parquet"):
        load_local_rows(path)


def test_unsupported_extension_names_the_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match=r"unsupported extension.*\.jsonl"):
        load_local_rows(path)


def test_unreachable_hub_dataset_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real load_dataset call, kept off the network (read at import, so patched where it is read).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"data.hub_id: .*nobody/no-such-dataset"):
        load_hub_rows("nobody/no-such-dataset", None, "train", None)
