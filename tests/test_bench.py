"""qlora-bench: options, settings parsing and the report (unit); every batch layout's loss against the
examples run one by one on the tiny model; one tiny end-to-end run on the CPU (slow)."""

from __future__ import annotations

import dataclasses
import json
import runpy
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import PreTrainedTokenizerBase, set_seed

from qlora_exp import attention
from qlora_exp.bench.data import bench_dataset
from qlora_exp.bench.measure import SettingResult, layout_collator, load_shared_base
from qlora_exp.bench.options import BENCH_MODELS, parse_options
from qlora_exp.bench.report import markdown_table, table_row, versions, write_report
from qlora_exp.bench.run import compose_model_section
from qlora_exp.bench.settings import LAYOUTS, Setting, order_settings, parse_setting, standard_settings
from qlora_exp.bench.timeline import NO_OP, idle_report
from qlora_exp.cli.bench import main
from qlora_exp.data.module import IGNORE_INDEX
from qlora_exp.embedded import EMBEDDED_MODELS, EMBEDDED_PREFIX
from qlora_exp.errors import ConfigError, ExitCode
from qlora_exp.model import attach_lora, check_liger, load_tokenizer
from qlora_exp.precision import cast_unquantized_params
from qlora_exp.run.directory import TRACKED_PACKAGES
from qlora_exp.schema import ModelConfig
from tests.support import compose_config, run_cli_in_process

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


@pytest.mark.parametrize(
    "spec", ["nocolon", "x:liger=2", "x:colour=red", "x:micro_batch=many", "x:optim=", "x:flex_block=big"]
)
def test_parse_setting_rejects_what_it_cannot_read(spec: str) -> None:
    with pytest.raises(ConfigError, match="--extra"):
        parse_setting(spec, standard_settings(GEMMA, 32)[2])


def test_options_are_frozen_and_take_the_machines_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    options = parse_options(
        ["--settings", "baseline,,defaults", "--extra", "a:liger=0", "--extra", "b:attn=sdpa"]
    )
    assert (options.model, options.examples_per_step, options.optim) == ("tiny", 8, "adamw_torch")
    assert options.settings == ("baseline", "defaults") and options.extra == ("a:liger=0", "b:attn=sdpa")
    # The longest setting: compiled attention warms up one step more than --warmup-steps.
    assert options.steps_max == max(options.loss_steps, options.warmup_steps + 1 + options.timed_steps)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.optim = "sgd"  # type: ignore[misc]
    with pytest.raises(ConfigError, match="--timed-steps must be >= 1"):
        parse_options(["--timed-steps", "0"])


def test_versions_are_the_run_directorys_plus_the_benchs_kernels() -> None:
    found = versions()
    assert list(found) == ["python", *TRACKED_PACKAGES, "liger-kernel", "triton"]
    assert found["torch"] == metadata.version("torch")
    assert all(isinstance(v, str) and v for v in found.values())  # "absent", never None, in bench.md


def test_micro_batch_must_divide_the_step() -> None:
    with pytest.raises(ConfigError, match="micro_batch=5 does not divide"):
        Setting("odd", "padding_free", 5, "eager", False).validate(32)


def test_a_flex_block_size_needs_flex_attention() -> None:
    with pytest.raises(ConfigError, match="flex_block=64 with attn=eager"):
        Setting("blocks", "padding_free", 4, "eager", False, flex_block_size=64).validate(32)
    Setting("blocks", "padding_free", 4, "flex_attention", False, flex_block_size=64).validate(32)
    flex = parse_setting("f64:attn=flex_attention,flex_block=64", standard_settings(GEMMA, 32)[2])
    assert flex.flex_block_size == 64 and parse_setting("f:flex_block=default", flex).flex_block_size is None


def test_flex_kernel_options_are_read_checked_and_shown() -> None:
    preset = dataclasses.replace(GEMMA, flex_kernel_options={"bwd_num_warps": 8})
    defaults = standard_settings(preset, 32)[2]
    assert defaults.flex_kernel_options == {"bwd_num_warps": 8}  # the preset's, as training runs
    tuned = parse_setting("tma:flex_options=bwd_num_warps=8+USE_TMA=true", defaults)
    assert tuned.flex_kernel_options == {"bwd_num_warps": 8, "USE_TMA": True}
    tuned.validate(32)
    assert "bwd_num_warps=8, USE_TMA=True" in table_row(
        SettingResult(setting=tuned, steps=1, warmup_steps=0), None, None
    )
    assert parse_setting("torch:flex_options=default", tuned).flex_kernel_options is None
    with pytest.raises(ConfigError, match=r"flex_options has 'PRESCALE_QK'.*Fix: "):
        parse_setting("p:flex_options=PRESCALE_QK=true", defaults).validate(32)
    with pytest.raises(ConfigError, match="flex_options are set but the attention is eager"):
        parse_setting("e:attn=eager,flex_block=default", tuned).validate(32)


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
        dataclasses.replace(defaults, compile_layers=True, lora_dropout=0.0),
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
    assert "| on | compiled |" in rows[4] and "| 0 | 5000 |" in rows[4]
    assert "| off | eager |" in rows[3] and "| n/a | 1000 |" in rows[3]  # no dropout given: n/a
    assert "out of memory" in rows[5]
    assert {row.count("|") for row in rows} == {rows[0].count("|")}  # every row fills every column


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


def test_python_dash_m_runs_the_bench_as_benchmarks_md_documents(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # What `python -m qlora_exp.bench --help` runs: the package's __main__ module with that argv.
    monkeypatch.setattr(sys, "argv", ["qlora_exp.bench", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("qlora_exp.bench", run_name="__main__", alter_sys=True)
    assert exc.value.code == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("usage: qlora-bench") and "--examples-per-step" in stdout


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
def test_bench_cli_runs_every_setting_on_identical_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attention, "flex_attention_trains_here", lambda: False)  # as on any CPU
    out = tmp_path / "bench"
    result = run_cli_in_process(
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
            "--extra",
            "flex:attn=flex_attention,compile=1",
            "--profile",
            "defaults",
        ),
        *("--out", str(out)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    names = [s["setting"]["name"] for s in report["settings"]]
    assert names == ["prototype", "baseline", "defaults", "res32", "flex"]
    # Flex attention has no backward on the CPU, and layers compile only with CUDA: that row runs, and
    # says it ran, on eager attention and uncompiled layers.
    assert report["settings"][-1]["setting"]["attn_implementation"] == "eager"
    assert report["settings"][-1]["setting"]["compile_layers"] is False
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
        first_steps = report["settings"][0]["step_real_tokens"]  # the profiled setting has one step more
        assert setting["step_real_tokens"][: len(first_steps)] == first_steps
    assert "| prototype | pad_to_max | 1 x 1 (a step each) |" in (out / "bench.md").read_text()
    assert "| fp32 | adamw_torch |" in (out / "bench.md").read_text()  # --optim's CPU default, per row
    assert "| defaults | padding_free | 2 x 1 |" in result.stdout
    # The profiled step: its table, its trace, and where the GPU idled (none here).
    assert (out / "profile_defaults.txt").read_text().startswith("GPU timeline: no GPU activity")
    assert (out / "profile_defaults.trace.json.gz").stat().st_size > 0


def test_idle_report_charges_each_gpu_hole_to_the_host_op_open_when_it_began(tmp_path: Path) -> None:
    ms = 1000.0  # trace times are in microseconds

    def span(name: str, cat: str, start: float, end: float, tid: int) -> dict[str, object]:
        return {
            "ph": "X",
            "cat": cat,
            "name": name,
            "ts": start * ms,
            "dur": (end - start) * ms,
            "pid": 1,
            "tid": tid,
        }

    kernels = [(0, 100, 7), (90, 160, 8), (300, 400, 7), (450, 460, 7), (480, 485, 7), (490, 500, 7)]
    events = [span("k", "kernel", start, end, stream) for start, end, stream in kernels]
    events += [
        span("step", "cpu_op", 130, 455, 1),
        span("aten::item", "cpu_op", 150, 305, 1),  # the host waits: the GPU finishes, then idles
        span("other", "cpu_op", 0, 50, 2),
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    report = idle_report(trace, min_hole_us=10 * ms).splitlines()
    assert report[0].startswith(
        "GPU timeline: 500.0 ms from first to last GPU work, busy 285.0 ms, idle 215.0 ms"
    )
    assert "in 4 holes; holes under 10000 µs: 5.0 ms in all" in report[0]
    assert report[2:] == [
        "  140.0 |     1 | step > aten::item",
        "   50.0 |     1 | step",
        f"   20.0 |     1 | {NO_OP}",
    ]


@pytest.fixture(scope="module", params=[True, False], ids=["checkpointing", "no-checkpointing"])
def tiny_bench_model(request: pytest.FixtureRequest) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The bench's tiny model as a setting builds it (4-bit base, eager attention, LoRA), with gradient
    checkpointing as the real models' presets have it and without (the tiny preset's way); its config
    keeps use_cache=true, as Gemma-2's."""
    model_cfg, lora_cfg = compose_model_section(*BENCH_MODELS["tiny"])
    assert model_cfg.attn_implementation == "eager"
    model_cfg = dataclasses.replace(model_cfg, gradient_checkpointing=request.param)
    set_seed(0)
    # No LoRA dropout: in training mode each forward would draw its own mask, and the losses compared
    # must come from the same function.
    model = attach_lora(load_shared_base(model_cfg, "eager"), dataclasses.replace(lora_cfg, dropout=0.0))
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) is request.param
    assert model.config.use_cache is True
    with torch.no_grad():  # LoRA starts as a no-op (B = 0); give it weight so it takes part in the check
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    return model, load_tokenizer(model_cfg)


def _separate_loss(model: PeftModel, examples: Dataset) -> float:
    """Each example alone, no padding, no flattening; their losses weighted by their target tokens."""
    total, targets = 0.0, 0
    for example in examples:
        labels = torch.tensor([example["labels"]])
        count = int((labels[:, 1:] != IGNORE_INDEX).sum())  # the model predicts token t+1 from t
        total += model(input_ids=torch.tensor([example["input_ids"]]), labels=labels).loss.item() * count
        targets += count
    return total / targets


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_every_bench_layout_gives_the_loss_of_its_examples_run_separately(
    tiny_bench_model: tuple[PeftModel, PreTrainedTokenizerBase], training: bool, tmp_path: Path
) -> None:
    # The bench builds its batches with the training path's collator, whose flattened batches carry
    # use_cache=False: with a cache (Gemma-2's config says use_cache=true) transformers drops the
    # per-example mask and flattened examples attend to each other. transformers 5.24 turns the cache
    # off by itself only for a checkpointed forward with gradients; the other three cases here need
    # the flag, so removing it from FlatteningCollator fails them.
    model, tokenizer = tiny_bench_model
    model.train(training)
    max_length = 128
    examples, _ = bench_dataset("builtin", tokenizer, 4, seed=42, out_dir=tmp_path, max_length=max_length)
    assert len(set(map(len, examples["input_ids"]))) > 1  # rows of different lengths: padding happens
    assert {s.layout for s in standard_settings(GEMMA, 4)} <= set(LAYOUTS)
    with torch.set_grad_enabled(training):
        separate = _separate_loss(model, examples)
        for layout in LAYOUTS:
            batch = layout_collator(layout, tokenizer, max_length)(list(examples))
            if layout == "pad_to_max":
                assert batch["input_ids"].shape == (4, max_length)
            loss = model(**batch).loss.item()
            assert loss == pytest.approx(separate, rel=1e-5), layout


@pytest.mark.parametrize("name", sorted(BENCH_MODELS))
def test_every_bench_model_is_an_embedded_shape_under_its_preset(name: str) -> None:
    """`qlora-bench --model NAME` composes NAME's preset around a checkpoint the builder knows."""
    preset, checkpoint = BENCH_MODELS[name]
    assert parse_options(["--model", name]).model == name
    model_cfg, _ = compose_model_section(preset, checkpoint)
    assert model_cfg.name_or_path == checkpoint
    assert checkpoint.removeprefix(EMBEDDED_PREFIX) in EMBEDDED_MODELS
    assert model_cfg.attn_implementation == compose_config(f"model={preset}").model.attn_implementation
