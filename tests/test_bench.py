"""qlora-bench: settings parsing and the report (unit), and one tiny end-to-end run on the CPU (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qlora_exp.bench import (
    Setting,
    SettingResult,
    main,
    markdown_table,
    order_settings,
    parse_setting,
    standard_settings,
    write_report,
)
from qlora_exp.errors import ConfigError, ExitCode
from qlora_exp.model import cast_unquantized_params, check_liger
from qlora_exp.schema import ModelConfig
from tests.conftest import compose_config, run_cli

GEMMA = ModelConfig(name_or_path="x", attn_implementation="flex_attention", use_liger_kernel=True)


def test_standard_settings_are_prototype_baseline_and_the_presets_defaults() -> None:
    prototype, baseline, defaults = standard_settings(GEMMA, 32)
    assert (prototype.layout, prototype.micro_batch, prototype.attn_implementation) == (
        "pad_to_max",
        1,
        "eager",
    )
    # The prototype's way: batch size 1 and an optimizer step after every example.
    assert prototype.step_every_micro_batch and not baseline.step_every_micro_batch
    assert (baseline.layout, baseline.micro_batch, baseline.use_liger_kernel) == ("dynamic_padding", 8, False)
    assert (defaults.layout, defaults.micro_batch) == ("padding_free", 32)
    assert (defaults.attn_implementation, defaults.use_liger_kernel) == ("flex_attention", True)


def test_parse_setting_overrides_only_what_it_names() -> None:
    defaults = standard_settings(GEMMA, 32)[2]
    variant = parse_setting(
        "no_liger:liger=0,micro_batch=16,upcast=1,fp32_residual=1,optim=adamw_torch", defaults
    )
    assert variant.name == "no_liger"
    assert (
        variant.use_liger_kernel,
        variant.micro_batch,
        variant.upcast_unquantized_params,
        variant.fp32_residual,
        variant.optim,
    ) == (False, 16, True, True, "adamw_torch")
    assert variant.attn_implementation == defaults.attn_implementation


@pytest.mark.parametrize("spec", ["nocolon", "x:liger=2", "x:colour=red", "x:micro_batch=many", "x:optim="])
def test_parse_setting_rejects_what_it_cannot_read(spec: str) -> None:
    with pytest.raises(ConfigError, match="--extra"):
        parse_setting(spec, standard_settings(GEMMA, 32)[2])


def test_micro_batch_must_divide_the_step() -> None:
    with pytest.raises(ConfigError, match="micro_batch=5 does not divide"):
        Setting("odd", "padding_free", 5, "eager", False).validate(32)


def test_liger_settings_run_last_because_the_patch_cannot_be_undone() -> None:
    prototype, baseline, defaults = standard_settings(GEMMA, 64)
    assert [s.name for s in order_settings([defaults, prototype, baseline])] == [
        "prototype",
        "baseline",
        "defaults",
    ]


def test_the_prototype_is_timed_on_its_own_groups_of_the_first_examples() -> None:
    prototype, baseline, defaults = standard_settings(GEMMA, 64)
    assert (prototype.steps_of(64), baseline.steps_of(64), defaults.steps_of(64)) == (16, 64, 64)
    assert standard_settings(GEMMA, 8)[0].steps_of(8) == 8  # never more than the others
    prototype.validate(64)  # 1 divides 16


def test_markdown_table_speed_against_the_prototype_and_loss_against_the_baseline() -> None:
    prototype, baseline, defaults = standard_settings(GEMMA, 32)
    first = SettingResult(prototype, accumulation=1, real_tokens_per_s=200.0, peak_memory_gb=10.0)
    reference = SettingResult(
        baseline, accumulation=4, real_tokens_per_s=1000.0, mean_loss_first_k=10.0, peak_memory_gb=20.0
    )
    fast = SettingResult(
        defaults,
        accumulation=1,
        real_tokens_per_s=5000.0,
        mean_loss_first_k=10.05,
        peak_memory_gb=12.5,
        mfu=0.2,
    )
    broken = SettingResult(defaults, error="out of memory: tried to allocate")
    table = markdown_table([first, reference, fast, broken], loss_steps=3)
    rows = table.splitlines()
    assert "mean loss, first 3 steps" in rows[0]
    assert "| x prototype |" in rows[0] and "| loss vs baseline |" in rows[0]
    assert "| 1 x 1 (a step each) |" in rows[2] and rows[2].endswith("| n/a | n/a |")  # loss not compared
    assert "| 5.0x |" in rows[3] and "| +0.00% |" in rows[3]
    assert "| 25.0x |" in rows[4] and "| +0.50% |" in rows[4] and "| 20.0% |" in rows[4]
    assert "| 32 x 1 |" in rows[4] and "| fp32 |" in rows[4]
    assert "out of memory" in rows[5]


def test_report_says_which_settings_were_timed_on_their_own_groups(tmp_path: Path) -> None:
    prototype, baseline, defaults = standard_settings(GEMMA, 64)
    meta = {
        "model": "m",
        "device": "d",
        "command": "c",
        "data": {"examples": 384, "mean_length": 243.0, "source": "long"},
        "examples_per_step": 64,
        "peak_tflops": 989.0,
        "versions": {"torch": "x"},
    }
    results = [SettingResult(prototype), SettingResult(baseline), SettingResult(defaults)]
    _, md_path = write_report(results, meta, tmp_path, loss_steps=3)
    report = md_path.read_text(encoding="utf-8")
    assert "every setting; prototype is timed on the first ones, in groups of 16" in report
    _, md_path = write_report(results[1:], meta, tmp_path, loss_steps=3)  # `--settings` without it
    assert "groups of" not in md_path.read_text(encoding="utf-8")


def test_liger_is_refused_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"model.use_liger_kernel.*Fix: model.use_liger_kernel=false"):
        check_liger(GEMMA)


def test_bench_refuses_liger_on_the_cpu_before_loading_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny", "--settings", "baseline", "--extra", "fast:liger=1", "--out", str(tmp_path)])
    assert exc.value.code == ExitCode.CONFIG
    assert not (tmp_path / "bench.json").exists()


def test_gemma2_preset_turns_the_speed_switches_on() -> None:
    model = compose_config("model=gemma2_9b_it").model
    assert model.attn_implementation == "flex_attention"
    assert model.use_liger_kernel is True
    assert model.upcast_unquantized_params is False
    assert model.fp32_residual is True


def test_cast_unquantized_params_round_trips_without_loss() -> None:
    layer = torch.nn.Linear(4, 4).to(torch.bfloat16)
    before = layer.weight.detach().clone()
    cast_unquantized_params(layer, torch.float32)
    assert layer.weight.dtype == torch.float32
    cast_unquantized_params(layer, torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, before)


@pytest.mark.slow
def test_bench_cli_runs_every_setting_on_identical_data(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = run_cli(
        "qlora-bench",
        *("--model", "tiny", "--data", "builtin", "--examples-per-step", "2", "--max-length", "64"),
        *(
            "--loss-steps",
            "2",
            "--warmup-steps",
            "0",
            "--timed-steps",
            "1",
            "--extra",
            "res32:upcast=0,fp32_residual=1",
        ),
        *("--out", str(out)),
        env={"OMP_NUM_THREADS": "1"},  # 2 shared cores: OpenMP spin-waiting makes CPU steps 20x slower
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    names = [s["setting"]["name"] for s in report["settings"]]
    assert names == ["prototype", "baseline", "defaults", "res32"]
    prototype, *others = report["settings"]
    # The prototype takes a step after every example: other optimizer steps, no comparable loss.
    assert prototype["mean_loss_first_k"] is None and len(prototype["step_losses"]) == 2
    losses = [s["mean_loss_first_k"] for s in others]
    # Same examples, same seed, same steps: layout must not change the loss. (On the CPU the compute
    # dtype is fp32, so res32 only exercises the switch; its effect is measured on the GPU.)
    assert max(losses) - min(losses) < 1e-3 * losses[0], losses
    for setting in report["settings"]:
        assert setting["error"] is None
        assert setting["real_tokens_per_s"] > 0
        assert setting["step_real_tokens"] == report["settings"][0]["step_real_tokens"]
    assert "| prototype | pad_to_max | 1 x 1 (a step each) |" in (out / "bench.md").read_text()
    assert "| fp32 | adamw_torch |" in (out / "bench.md").read_text()  # --optim's CPU default, per row
    assert "| defaults | padding_free | 2 x 1 |" in result.stdout
