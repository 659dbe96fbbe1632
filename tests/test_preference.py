"""DPO (method=dpo) on the tiny 4-bit model: the reference is the base with the adapter disabled (or,
on top of a finished SFT run, that run's adapter, frozen), the adapter stays as the factory made it,
whole runs complete with reward figures, and a resumed run equals the uninterrupted one."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import yaml
from safetensors.torch import load_file

from qlora_exp import preference
from qlora_exp.data.preference import build_data_module
from qlora_exp.errors import ExitCode
from qlora_exp.model import attach_lora, load_tokenizer
from qlora_exp.preference import REFERENCE_ADAPTER, PreferenceTrainer, build_preference_trainer
from qlora_exp.run.finished import FinishedRun
from qlora_exp.run.init_from import starting_run
from qlora_exp.schema import LoraConfig, to_schema
from tests.support import TINY_RUN, compose_config, train_in_process

# One worker runs the module: its tests read one DPO run (module fixture).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dpo_run")]

# The SFT tiny run's size (tests/support.py) on synthetic pairs, 4 steps with a checkpoint every 2.
# With gradient checkpointing, as every real preset: TRL re-enables it, and turns it off around the
# reference forward.
TINY_DPO = ("experiment=dpo_smoke", *TINY_RUN[1:], "trainer.max_steps=4", "model.gradient_checkpointing=true")
REWARDS = (
    "reward_accuracy",
    "reward_margin",
    "reward_chosen",
    "reward_rejected",
    "logps_chosen",
    "logps_rejected",
)


def build_trainer(tmp_path: Path, *overrides: str, start: FinishedRun | None = None) -> PreferenceTrainer:
    cfg = to_schema(compose_config(*TINY_DPO, "data.synthetic_size=16", *overrides))
    tokenizer = load_tokenizer(cfg.model)
    data = build_data_module(cfg, tokenizer)
    data.setup()
    return build_preference_trainer(cfg, tokenizer, data, tmp_path, start)


def a_batch(trainer: PreferenceTrainer) -> dict[str, torch.Tensor]:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(4)])  # type: ignore[index]


def sequence_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the answer tokens from the model's plain forward (its own LM head and
    softcap), per chosen and rejected sequence: computed here independently of TRL."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["input_ids"][:, 1:]
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    summed = (logps * batch["completion_mask"][:, 1:]).sum(dim=1)
    chosen, rejected = summed.chunk(2)
    return chosen, rejected


def reference_logps(trainer: PreferenceTrainer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))


def perturb_adapter(model: torch.nn.Module) -> None:
    """Make the trained adapter clearly change the model (LoRA's B starts at zero)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_B" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def test_fresh_adapter_reference_is_the_base_and_the_adapter_stays_fp32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: dict[str, torch.Tensor] = {}

    def recording_attach_lora(*args: Any) -> peft.PeftModel:
        model = attach_lora(*args)
        made.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return model

    monkeypatch.setattr(preference, "attach_lora", recording_attach_lora)
    trainer = build_trainer(tmp_path)
    model = trainer.model
    assert isinstance(model, peft.PeftModel)
    # No second copy of anything: TRL's copy of the adapter is gone, the reference is the disabled adapter.
    assert list(model.peft_config) == ["default"]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable.keys() == made.keys()
    for name, param in trainable.items():  # TRL cast them to bf16; the factory's fp32 values are back
        assert param.dtype == torch.float32 and torch.equal(param, made[name]), name

    perturb_adapter(model)  # as training would: now the adapter changes the model's answers
    batch = a_batch(trainer)
    with model.disable_adapter():
        base = torch.cat(sequence_logps(model, batch))
    policy = torch.cat(sequence_logps(model, batch))
    torch.testing.assert_close(reference_logps(trainer, batch), base, rtol=1e-5, atol=1e-4)
    assert (policy - base).abs().max() > 0.1  # the adapter matters, so equality above means something


def test_reference_on_a_finished_sft_run_is_its_adapter_frozen(tmp_path: Path, smoke_run: Path) -> None:
    start = FinishedRun(smoke_run)
    trainer = build_trainer(tmp_path, start=start)
    model = trainer.model
    assert isinstance(model, peft.PeftModel)
    assert set(model.peft_config) == {"default", REFERENCE_ADAPTER}
    assert not any(p.requires_grad for n, p in model.named_parameters() if f".{REFERENCE_ADAPTER}." in n)
    saved = load_file(smoke_run / "adapter" / "adapter_model.safetensors")
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trained) == len(saved)
    for name, param in trained.items():  # the run's adapter, exact and in fp32, continues training
        assert param.dtype == torch.float32
        torch.testing.assert_close(param, saved[name.replace(".default", "")], rtol=0, atol=0)

    batch = a_batch(trainer)
    start_logps = torch.cat(sequence_logps(model, batch))
    reference = reference_logps(trainer, batch)
    torch.testing.assert_close(reference, start_logps, rtol=1e-5, atol=1e-4)  # the SFT model...
    with model.disable_adapter():
        base = torch.cat(sequence_logps(model, batch))
    assert (reference - base).abs().max() > 0.1  # ...not the base it started from
    perturb_adapter(model)  # training moves the policy; the reference stays the SFT model
    torch.testing.assert_close(reference_logps(trainer, batch), start_logps, rtol=1e-5, atol=1e-4)
    assert (torch.cat(sequence_logps(model, batch)) - start_logps).abs().max() > 0.1


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted DPO run from a fresh adapter, checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("dpo") / "run"
    train_in_process(run_dir, *TINY_DPO)
    return run_dir


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def test_dpo_from_scratch_completes_with_reward_figures(dpo_run: Path) -> None:
    assert (dpo_run / "COMPLETED").is_file()
    metrics = read_json(dpo_run / "metrics.json")
    for name in REWARDS:
        assert isinstance(metrics[name], float) and isinstance(metrics[f"{name}_before"], float), name
    # Before training the policy is its reference: no reward either way, the DPO loss is log 2.
    assert metrics["reward_margin_before"] == 0 and metrics["reward_accuracy_before"] == 0
    assert metrics["eval_loss_before"] == pytest.approx(0.6931, abs=1e-4)
    assert metrics["reward_margin"] != 0 and metrics["train_steps"] == 4
    assert "perplexity" not in metrics  # exp(DPO loss) means nothing
    assert [entry["step"] for entry in metrics["eval_history"]] == [0, 4]
    assert set(REWARDS) <= metrics["eval_history"][-1].keys()
    assert any("rewards/accuracies" in entry for entry in read_json(dpo_run / "log_history.json"))
    assert read_json(dpo_run / "data_stats.json")["format"] == "alpaca"  # the synthetic pairs
    assert sorted(p.name for p in (dpo_run / "adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    samples = [json.loads(line) for line in (dpo_run / "samples.jsonl").read_text().splitlines()]
    assert samples and all("reference" in s and "generation_before" in s for s in samples)


def per_step(run_dir: Path) -> list[tuple[float, ...]]:
    final = run_dir / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    return [
        (e["step"], e["loss"], e["grad_norm"], e["rewards/margins"], e["logps/chosen"])
        for e in read_json(final)["log_history"]
        if "loss" in e
    ]


def test_a_resumed_dpo_run_equals_the_uninterrupted_one(
    dpo_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert (dpo_run / "checkpoints" / "checkpoint-2" / "qlora_checkpoint.json").is_file()  # atomic, verified
    caplog.set_level(logging.INFO, logger="qlora_exp")
    # The run as it stood when stopped after its step-2 checkpoint: nothing written after it.
    run_dir = tmp_path / "run"
    later = {"COMPLETED", "metrics.json", "adapter", "tokenizer", "samples.jsonl", "checkpoint-4"}
    shutil.copytree(dpo_run, run_dir, ignore=lambda _, names: [n for n in names if n in later])
    train_in_process(run_dir, *TINY_DPO)
    assert (run_dir / "COMPLETED").is_file()
    assert f"resuming {run_dir} from {run_dir / 'checkpoints' / 'checkpoint-2'}" in caplog.text
    assert [step for step, *_ in per_step(run_dir)] == [1, 2, 3, 4]
    torch.testing.assert_close(
        torch.tensor(per_step(run_dir)), torch.tensor(per_step(dpo_run)), rtol=0, atol=1e-6
    )
    resumed, reference = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (run_dir, dpo_run))
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6)
    assert read_json(run_dir / "metrics.json")["eval_loss"] == pytest.approx(
        read_json(dpo_run / "metrics.json")["eval_loss"], abs=1e-6
    )


def test_dpo_on_top_of_a_finished_sft_run(smoke_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_in_process(
        run_dir, *TINY_DPO, "trainer.max_steps=2", "eval.num_samples=0", f"method.init_from={smoke_run}"
    )
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["reward_margin_before"] == 0  # the reference is where the policy starts: the SFT model
    assert all(isinstance(metrics[name], float) for name in REWARDS)
    started, ended = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (smoke_run, run_dir))
    assert started.keys() == ended.keys()  # the SFT adapter, trained further
    assert any(not torch.equal(started[name], ended[name]) for name in started)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.revision=another-commit", "an adapter only fits the base model it was trained on"),
        ("lora.r=8", "trained with lora.r=16, this run sets lora.r=8"),
        (
            "data.chat_template=chatml",
            "trained with data.chat_template=None, this run sets data.chat_template=chatml",
        ),
    ],
)
def test_init_from_refuses_a_run_that_does_not_fit(
    smoke_run: Path, tmp_path: Path, override: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_in_process(tmp_path / "run", *TINY_DPO, f"method.init_from={smoke_run}", override)
    assert exit_info.value.code == ExitCode.CONFIG
    assert message in caplog.text
    assert not (tmp_path / "run").exists()  # refused before the run directory, data or weights


def test_init_from_takes_the_runs_adapter_settings_this_run_leaves_at_their_defaults(
    smoke_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A finished run trained with another LoRA shape and template (its record edited: only read here).
    run = tmp_path / "sft"
    shutil.copytree(smoke_run, run)
    trained = yaml.safe_load((run / "resolved_config.yaml").read_text())
    trained["lora"].update(r=8, alpha=16, target_modules=["q_proj", "v_proj"], dropout=0.1)
    trained["data"]["chat_template"] = "chatml"
    (run / "resolved_config.yaml").write_text(yaml.safe_dump(trained))
    caplog.set_level(logging.INFO, logger="qlora_exp")
    cfg = compose_config(*TINY_DPO, f"method.init_from={run}")
    continued, start = starting_run(cfg, to_schema(cfg))
    assert start is not None and start.path == run
    schema = to_schema(continued)
    assert (schema.lora.r, schema.lora.alpha, schema.lora.target_modules) == (8, 16, ["q_proj", "v_proj"])
    assert schema.data.chat_template == "chatml"
    assert schema.lora.dropout == LoraConfig().dropout  # not the run's 0.1: dropout is off under DPO
    assert f"method.init_from: from {run}: lora.r=8, lora.alpha=16" in caplog.text


def test_init_from_must_be_a_finished_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_in_process(tmp_path / "run", *TINY_DPO, f"method.init_from={tmp_path}")
    assert exit_info.value.code == ExitCode.CONFIG
    assert "method.init_from" in caplog.text and "not a finished run" in caplog.text
