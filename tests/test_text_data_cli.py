"""`qlora-train` on data other than chat pairs, end to end: plain text (continued pre-training), whose
held-out samples continue a text without the chat template, and messages exported as content parts
carrying `value`, with per-message `loss_weight`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import run_cli_in_process


def _text_rows() -> list[dict[str, object]]:
    english = [
        {"text": f"Line {i}: the quick brown fox jumps over the lazy dog {i} times."} for i in range(12)
    ]
    chinese = [{"text": f"第{i}行：敏捷的棕色狐狸跳过了懒狗{i}次。"} for i in range(12)]
    return english + chinese


def _part(text: str) -> list[dict[str, str]]:
    return [{"type": "text", "value": text}]


def _content_part_rows() -> list[dict[str, object]]:
    """Two answers per row: the first not trained (loss_weight 0), the second trained."""
    return [
        {
            "messages": [
                {"role": "user", "content": _part(f"What is {i} + 1?"), "loss_weight": 0},
                {"role": "assistant", "content": _part(str(i + 1)), "loss_weight": 0},
                {"role": "user", "content": _part(f"{i} 加 2 等于几？"), "loss_weight": 0},
                {"role": "assistant", "content": _part(str(i + 2)), "loss_weight": 1},
            ]
        }
        for i in range(24)
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rows", "data_format"),
    [(_text_rows(), "text"), (_content_part_rows(), "messages")],
    ids=["text", "content-parts"],
)
def test_user_data_trains_evaluates_and_samples(
    tmp_path: Path, rows: list[dict[str, object]], data_format: str
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows), encoding="utf-8")
    run_dir = tmp_path / "run"
    result = run_cli_in_process(
        "qlora-train", "experiment=smoke", "data=local", f"data.path={data}", f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (run_dir / "COMPLETED").exists()
    stats = json.loads((run_dir / "data_stats.json").read_text())
    assert stats["format"] == data_format and stats["rows_kept"] == len(rows), stats["rows_dropped"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval_loss"] > 0 and metrics["exact_match_samples"] > 0
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == metrics["exact_match_samples"]
    assert all(sample["prompt"] and sample["reference"] and "generation" in sample for sample in samples)
    if data_format == "text":
        # A held-out text cut in two: the prompt is its start, the reference the rest, no template.
        texts = {str(row["text"]) for row in rows}
        assert all(sample["prompt"] + sample["reference"] in texts for sample in samples)
    else:
        # The reference is the last (trained) answer; the prompt the user turn before it.
        assert all(sample["prompt"].endswith("等于几？") for sample in samples)
