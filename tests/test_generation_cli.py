"""End to end: a smoke run's samples and exact match, then qlora-generate on the finished run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_exp.cli import generate
from qlora_exp.errors import ExitCode
from tests.support import run_cli_in_process, train_in_process

pytestmark = pytest.mark.slow


def read_samples(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()]


def test_run_writes_samples_exact_match_and_eval_history(smoke_run: Path) -> None:
    samples = read_samples(smoke_run)
    assert len(samples) == 4  # eval.num_samples in experiments/smoke.yaml
    for row in samples:
        assert set(row) == {"prompt", "reference", "generation", "generation_before", "exact_match"}
        assert row["prompt"] and row["reference"]
        assert row["exact_match"] == (row["generation"].strip() == row["reference"].strip())
    # The untrained random model rambles; generations are real model output, not placeholders.
    assert all(row["generation_before"] for row in samples)
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert 0.0 <= metrics["exact_match_before"] <= 1.0 and 0.0 <= metrics["exact_match"] <= 1.0
    assert metrics["exact_match"] == sum(r["exact_match"] for r in samples) / len(samples)
    steps = [entry["step"] for entry in metrics["eval_history"]]
    # Before training, then every trainer.eval_steps; the last (step 4 = max_steps) is also the final.
    assert steps == [0, 2, 4], steps
    assert metrics["eval_history"][0]["eval_loss"] == pytest.approx(metrics["eval_loss_before"])
    assert metrics["eval_history"][-1]["eval_loss"] == pytest.approx(metrics["eval_loss"])


def test_generate_file_reproduces_the_in_memory_generations(
    smoke_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = read_samples(smoke_run)
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": row["prompt"], "id": i} for i, row in enumerate(samples)]
    lines[1] = {"messages": [{"role": "user", "content": samples[1]["prompt"]}], "id": 1}
    prompts.write_text(
        "\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n\n", encoding="utf-8"
    )
    generate.main([str(smoke_run), "--file", str(prompts)])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["id"] for row in out] == list(range(len(samples)))  # input fields pass through
    # Same weights, template and greedy decoding (the run's eval settings) as the run's own
    # in-memory samples: the same text.
    assert [row["generation"] for row in out] == [row["generation"] for row in samples]
    # ...and the adapter matters: the untrained model said something else.
    assert any(row["generation"] != row["generation_before"] for row in samples)


def test_generate_prompt_prints_the_answer(smoke_run: Path) -> None:
    sample = read_samples(smoke_run)[0]
    result = run_cli_in_process("qlora-generate", str(smoke_run), "--prompt", sample["prompt"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == sample["generation"]
    assert "INFO" not in result.stdout  # logs go to stderr, stdout is the answer alone


def test_generate_reports_bad_input_with_its_line(
    smoke_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"messages": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(SystemExit) as exit_info:
        generate.main([str(smoke_run), "--file", str(prompts)])
    assert exit_info.value.code == ExitCode.DATA
    assert f"{prompts}:2" in caplog.text and "ending with a user turn" in caplog.text


def test_generate_refuses_a_directory_that_is_not_a_finished_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        generate.main([str(tmp_path), "--prompt", "hi"])
    assert exit_info.value.code == ExitCode.RUN_DIR
    assert "not a finished run" in caplog.text


def test_early_stopping_keeps_the_best_adapter_and_samples_every_eval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A constant, far too high learning rate makes eval_loss rise within a few steps (seeded).
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        train_in_process(
            run_dir,
            "experiment=smoke",
            "eval.num_samples=2",
            "eval.max_new_tokens=2",
            "eval.samples_every_eval=true",
            "trainer.max_steps=8",
            "trainer.eval_steps=1",
            "trainer.learning_rate=0.05",
            "trainer.lr_scheduler_type=constant",
            "trainer.warmup_steps=0",
            "trainer.early_stopping_patience=1",
            "trainer.load_best_model_at_end=true",
        )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = metrics["eval_history"]
    during = history[1:-1]  # [0] is before training, [-1] the final evaluation
    assert metrics["train_steps"] < 8, "eval_loss rose, so training should have stopped early"
    best = min(during, key=lambda entry: entry["eval_loss"])
    assert during[-1]["eval_loss"] > best["eval_loss"]
    # The final evaluation is of the reloaded best adapter: the same weights, the same batches,
    # the same kernels, so the same loss to the last bit.
    assert metrics["eval_loss"] == best["eval_loss"]
    # ...and the saved adapter is that checkpoint's, tensor for tensor.
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    kept = load_file(run_dir / "checkpoints" / f"checkpoint-{best['step']}" / "adapter_model.safetensors")
    assert saved.keys() == kept.keys()
    assert all(torch.equal(saved[name], kept[name]) for name in kept)
    assert "exact match during" in caplog.text  # eval.samples_every_eval at evaluations
