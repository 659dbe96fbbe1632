"""A user's own file through `qlora-train` (in-process: what the script runs after Hydra composed the
config): the dry-run preview, a bad file, and a smoke training run on a chat-messages JSONL with packing."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from qlora_exp.errors import ExitCode
from tests.support import train_in_process


def _messages_file(path: Path, rows: int = 40) -> Path:
    lines = []
    for i in range(rows):
        messages = [
            {"role": "system", "content": "Answer with the number only."},
            {"role": "user", "content": f"What is {i} + {i + 1}?"},
            {"role": "assistant", "content": str(2 * i + 1)},
            {"role": "user", "content": "And doubled?"},
            {"role": "assistant", "content": str(4 * i + 2)},
        ]
        lines.append(json.dumps({"messages": messages}))
    lines.append(json.dumps({"messages": [{"role": "tool", "content": "42"}]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_dry_run_previews_a_user_file_without_loading_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    data = _messages_file(tmp_path / "chat.jsonl")
    with caplog.at_level(logging.INFO):
        train_in_process(
            tmp_path / "run", "experiment=smoke", "data=local", f"data.path={data}", "dry_run=true"
        )
    out = capsys.readouterr().out
    assert "41 rows read" in out and "format messages" in out
    # Three examples of two assistant turns, each trained span marked up to its end of turn.
    assert out.count("<end_of_turn>\n»") == 6
    assert "--- train length histogram (tokens) ---" in out
    assert "unmappable_role: 1" in out and "chat.jsonl:41" in out
    assert "steps per epoch:" in out and "trainer.max_steps=4" in out
    assert "LoRA:" not in caplog.text  # tokenizer only: no model was built
    assert not (tmp_path / "run" / "COMPLETED").exists()


def test_bad_file_exits_with_the_data_code_and_names_file_and_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(SystemExit) as exit_info:
        train_in_process(tmp_path / "run", "experiment=smoke", "data=local", f"data.path={data}")
    assert exit_info.value.code == ExitCode.DATA
    assert "latin1.jsonl:2: not valid UTF-8" in caplog.text
    assert "latin1.jsonl:2: not valid UTF-8" in (tmp_path / "run" / "FAILED").read_text()


@pytest.mark.slow
def test_smoke_training_on_a_messages_jsonl_with_packing(tmp_path: Path) -> None:
    data = _messages_file(tmp_path / "chat.jsonl")
    run_dir = tmp_path / "run"
    train_in_process(run_dir, "experiment=smoke", "data=local", f"data.path={data}", "data.packing=packed")
    assert (run_dir / "COMPLETED").exists()
    stats = json.loads((run_dir / "data_stats.json").read_text())
    assert stats["format"] == "messages" and stats["rows_dropped"] == {"unmappable_role": 1}
    assert stats["packing"]["mode"] == "packed" and stats["packing"]["batch_rows"] < stats["train_rows"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["eval_loss"]) and metrics["train_steps"] == 4
