"""qlora-merge: the merged checkpoint loads with plain transformers and matches base + adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_exp.cli import merge
from qlora_exp.cli.merge import merge_run
from qlora_exp.errors import ExitCode, RunDirectoryError
from qlora_exp.model import resolve_source
from qlora_exp.run.finished import FinishedRun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def merged_dir(smoke_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "model"
    merge.main([str(smoke_run), "--out", str(out), "--dtype", "bf16"])  # qlora-merge, in-process
    return out


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def test_merged_model_loads_without_peft_and_matches_base_plus_adapter(
    smoke_run: Path, merged_dir: Path
) -> None:
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert type(merged).__name__ == "Gemma2ForCausalLM" and merged.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    input_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 30?"}], add_generation_prompt=True, return_tensors="pt"
    )
    if not isinstance(input_ids, torch.Tensor):  # a BatchEncoding in newer transformers
        input_ids = input_ids["input_ids"]
    run = FinishedRun(smoke_run)
    with_adapter = logits(run.load_16bit_model(torch.bfloat16), input_ids)
    base = AutoModelForCausalLM.from_pretrained(resolve_source(run.config.model), dtype=torch.bfloat16)
    merged_logits = logits(merged, input_ids)
    # bf16 rounding of W + BA versus W x + B(A x): differences of a few bf16 ulps.
    torch.testing.assert_close(merged_logits, with_adapter, atol=0.05, rtol=0.02)
    # The adapter moved the logits far beyond that tolerance, so the comparison above means something.
    assert (merged_logits - logits(base, input_ids)).abs().max() > 0.2
    assert json.loads((merged_dir / "qlora_merge.json").read_text())["dtype"] == "bf16"


def test_merge_refuses_a_non_empty_out_and_leaves_it_intact(
    smoke_run: Path, merged_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weights = merged_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    with pytest.raises(SystemExit) as exit_info:
        merge.main([str(smoke_run), "--out", str(merged_dir)])
    assert exit_info.value.code == ExitCode.RUN_DIR
    assert "not empty; refusing to overwrite" in caplog.text
    assert weights.stat().st_mtime_ns == before


def test_merge_fp16_into_an_existing_empty_directory(smoke_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    merge_run(FinishedRun(smoke_run), out, "fp16")
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging directory left behind"
    with pytest.raises(RunDirectoryError, match="not empty"):
        merge_run(FinishedRun(smoke_run), out, "fp16")
