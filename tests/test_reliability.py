"""Unit tests for checkpoints, resume, guards and secret redaction (in-process, fast)."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import TrainerControl, TrainerState, TrainingArguments

from qlora_exp import experiment
from qlora_exp.checkpoint import (
    MANIFEST,
    AtomicCheckpointTrainer,
    CheckpointInvalid,
    find_resumable_checkpoint,
    logged_train_loss,
    publish_checkpoint,
    rotate_checkpoints,
    tokens_before,
    verify_checkpoint,
    write_manifest,
)
from qlora_exp.cli import train
from qlora_exp.errors import (
    ConfigError,
    ExitCode,
    NumericalError,
    PreemptedError,
    RequeuedExit,
    RunDirectoryError,
)
from qlora_exp.guards import NonFiniteGuard, PreemptionCallback, oom_advice
from qlora_exp.run.context import RunContext
from qlora_exp.run.directory import COMPLETED, REDACTED, RunDirectory
from qlora_exp.run.redaction import SecretLogFilter, redact_hydra_files, scrub
from qlora_exp.run.resume import changed_settings, prepare_resume
from tests.support import compose_config


def make_checkpoint(root: Path, step: int, payload: bytes = b"weights") -> Path:
    """A directory with the files a Trainer checkpoint holds, not yet published."""
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (path / name).write_bytes(f"{name}-{step}".encode())
    (path / "adapter_model.safetensors").write_bytes(payload * 100)
    return path


def complete_checkpoint(root: Path, step: int) -> Path:
    path = make_checkpoint(root, step)
    write_manifest(path)
    return path


def test_complete_checkpoint_verifies(tmp_path: Path) -> None:
    verify_checkpoint(complete_checkpoint(tmp_path, 2))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: (p / MANIFEST).unlink(), "never finished"),
        (lambda p: (p / "optimizer.pt").unlink(), "optimizer.pt is missing"),
        (lambda p: (p / "adapter_model.safetensors").write_bytes(b"w"), "truncated"),
        (lambda p: (p / "scheduler.pt").write_bytes(b"scheduler.pt-X"), "SHA-256"),
        (lambda p: (p / MANIFEST).write_text("{not json"), "unreadable"),
    ],
)
def test_damaged_checkpoint_is_invalid(tmp_path: Path, damage, reason: str) -> None:
    path = complete_checkpoint(tmp_path, 2)
    damage(path)
    with pytest.raises(CheckpointInvalid, match=reason):
        verify_checkpoint(path)


def test_manifest_requires_the_trainer_files(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path, 2)
    (path / "scheduler.pt").unlink()
    write_manifest(path)
    with pytest.raises(CheckpointInvalid, match=r"lacks scheduler\.pt"):
        verify_checkpoint(path)


def test_newest_torn_checkpoint_is_skipped_with_warning(tmp_path: Path, caplog) -> None:
    complete_checkpoint(tmp_path, 2)
    complete_checkpoint(tmp_path, 4)
    (tmp_path / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"")
    make_checkpoint(tmp_path, 6)  # crashed before its manifest
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name: ignored
    with caplog.at_level(logging.WARNING, logger="qlora_exp.checkpoint"):
        assert find_resumable_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    skipped = [r.getMessage() for r in caplog.records]
    assert any("checkpoint-6" in m and "never finished" in m for m in skipped)
    assert any("checkpoint-4" in m and "truncated" in m for m in skipped)


def test_no_checkpoint_dir_means_fresh_start(tmp_path: Path) -> None:
    assert find_resumable_checkpoint(tmp_path / "absent") is None


def test_publish_replaces_a_torn_copy_of_the_same_step(tmp_path: Path) -> None:
    torn = make_checkpoint(tmp_path, 4, payload=b"old")
    staged = make_checkpoint(tmp_path / ".staging-checkpoint-4", 4, payload=b"new")
    publish_checkpoint(staged, torn)
    verify_checkpoint(torn)
    assert (torn / "adapter_model.safetensors").read_bytes().startswith(b"new")
    assert not staged.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".staging-checkpoint-4", "checkpoint-4"]


def test_rotation_keeps_newest_complete_and_never_counts_torn(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        complete_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 8)  # torn: not counted, not deleted here
    rotate_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]


def test_logged_train_loss_weights_each_entry_by_its_steps() -> None:
    state = TrainerState(
        log_history=[{"step": 1, "loss": 4.0}, {"step": 3, "loss": 1.0}, {"step": 3, "eval_loss": 9}]
    )
    assert logged_train_loss(state) == pytest.approx((4.0 + 2 * 1.0) / 3)
    assert math.isnan(logged_train_loss(TrainerState()))


def test_tokens_before_reads_the_checkpoint_state(tmp_path: Path) -> None:
    (tmp_path / "trainer_state.json").write_text('{"num_input_tokens_seen": 123}')
    assert tokens_before(tmp_path) == 123
    assert tokens_before(None) == 0


class TinyRegressor(torch.nn.Module):
    """The smallest model a Trainer can train and checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), labels)}


def test_trainer_checkpoints_are_published_atomically_and_rotated(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / ".staging-checkpoint-9" / "checkpoint-9").mkdir(parents=True)  # a crash mid-save
    args = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=3,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=2,
        per_device_train_batch_size=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    generator = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(2, generator=generator), "labels": torch.tensor(1.0)} for _ in range(8)]
    AtomicCheckpointTrainer(model=TinyRegressor(), args=args, train_dataset=data).train()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    for path in checkpoints.iterdir():
        verify_checkpoint(path)
    assert find_resumable_checkpoint(checkpoints) == checkpoints / "checkpoint-3"


def test_changed_settings_lists_what_matters_only() -> None:
    old = {"seed": 1, "lora": {"r": 16}, "trainer": {"per_device_train_batch_size": 8, "logging_steps": 10}}
    new = {
        "seed": 1,
        "lora": {"r": 8},
        "trainer": {"per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 5},
        "tracking": {"mode": "online"},
        "resume": "/x",
    }
    assert changed_settings(old, new) == [
        "lora.r: 16 -> 8",
        "trainer.per_device_train_batch_size: 8 -> 4",
    ]


def _resolved(*overrides: str) -> dict:
    return OmegaConf.to_container(compose_config("experiment=smoke", *overrides), resolve=True)


def test_prepare_resume_refuses_changed_config_unless_forced(tmp_path: Path) -> None:
    RunDirectory(tmp_path).write_resolved_config(_resolved())
    complete_checkpoint(tmp_path / "checkpoints", 2)
    changed = _resolved("lora.r=8", "trainer.gradient_accumulation_steps=2", "trainer.logging_steps=3")
    with pytest.raises(ConfigError) as info:
        prepare_resume(tmp_path, changed, resume=None, force=False)
    message = str(info.value)
    assert "lora.r: 16 -> 8" in message
    assert "trainer.gradient_accumulation_steps: 1 -> 2" in message
    assert "logging_steps" not in message
    assert "resume_force=true" in message
    assert (
        prepare_resume(tmp_path, changed, resume=None, force=True)
        == tmp_path / "checkpoints" / "checkpoint-2"
    )
    assert prepare_resume(tmp_path, _resolved("trainer.logging_steps=3"), None, False) is not None


def test_prepare_resume_fresh_dir_and_bad_resume_values(tmp_path: Path) -> None:
    assert prepare_resume(tmp_path, _resolved(), resume=None, force=False) is None
    with pytest.raises(ConfigError, match="no run there"):
        prepare_resume(tmp_path, _resolved(), resume=str(tmp_path), force=False)
    with pytest.raises(ConfigError, match="but the run directory is"):
        prepare_resume(tmp_path, _resolved(), resume=str(tmp_path / "other"), force=False)


def test_resume_sets_the_hydra_run_dir(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(train.CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"resume={tmp_path}"], return_hydra_config=True)
        default = compose("config", return_hydra_config=True)
    assert cfg.hydra.run.dir == str(tmp_path)
    assert default.hydra.run.dir.startswith("outputs/runs/")


def test_completed_run_directory_is_never_reopened(tmp_path: Path) -> None:
    (tmp_path / COMPLETED).write_text("ok\n")
    with pytest.raises(RunDirectoryError, match="COMPLETED"), RunDirectory(tmp_path):
        pass
    assert (tmp_path / COMPLETED).is_file()
    assert not (tmp_path / ".run.lock").exists()


def test_run_directory_held_by_a_live_process_is_refused(tmp_path: Path) -> None:
    (tmp_path / ".run.lock").write_text(str(os.getpid()))
    with pytest.raises(RunDirectoryError, match=f"in use by process {os.getpid()}"), RunDirectory(tmp_path):
        pass
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True, text=True
    )
    (tmp_path / ".run.lock").write_text(dead.stdout.strip())
    with RunDirectory(tmp_path):
        assert (tmp_path / ".run.lock").read_text() == f"{os.getpid()} {socket.gethostname()}"


def test_a_requeued_job_is_marked_until_it_resumes_and_is_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reason = "requeued by submitit after SIGUSR2: checkpoint saved at step 3 of 6"
    with pytest.raises(RequeuedExit), caplog.at_level(logging.WARNING), RunDirectory(tmp_path):
        raise RequeuedExit(144, reason)
    assert (tmp_path / "FAILED").read_text() == reason + "\n"
    assert not (tmp_path / ".run.lock").exists()
    assert [r.levelname for r in caplog.records if reason in r.getMessage()] == ["WARNING"]
    with RunDirectory(tmp_path):  # the requeued job reopens the directory: the marker goes
        assert not (tmp_path / "FAILED").exists()


def test_a_lock_from_another_host_does_not_block_a_requeued_job(tmp_path: Path) -> None:
    # A job requeued onto another node finds the lock its killed predecessor left on the shared
    # filesystem; that pid may well be alive here, as another process.
    (tmp_path / ".run.lock").write_text(f"{os.getpid()} some-other-node")
    with RunDirectory(tmp_path):
        assert (tmp_path / ".run.lock").read_text() == f"{os.getpid()} {socket.gethostname()}"
    with pytest.raises(RunDirectoryError, match="in use"):
        (tmp_path / ".run.lock").write_text(f"{os.getpid()} {socket.gethostname()}")
        with RunDirectory(tmp_path):
            pass


def _control() -> TrainerControl:
    return TrainerControl()


def test_preemption_signal_saves_then_raises(tmp_path: Path) -> None:
    callback = PreemptionCallback()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state = TrainerState(global_step=3, max_steps=6)
    before = signal.getsignal(signal.SIGUSR1)
    callback.on_train_begin(args, state, _control())
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert callback.signal_name == "SIGUSR1"
        control = callback.on_step_end(args, state, _control())
        assert control.should_save and control.should_training_stop
        with pytest.raises(PreemptedError, match="SIGUSR1: checkpoint saved at step 3 of 6") as info:
            callback.on_save(args, state, control)
        assert info.value.exit_code == ExitCode.PREEMPTED == 75
    finally:
        callback.restore()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_no_signal_means_no_stop(tmp_path: Path) -> None:
    callback = PreemptionCallback()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    control = callback.on_step_end(args, TrainerState(), _control())
    assert not control.should_training_stop
    callback.on_save(args, TrainerState(), control)


def _model_with_grad(value: float) -> torch.nn.Module:
    model = torch.nn.Linear(2, 1)
    for p in model.parameters():
        p.grad = torch.full_like(p, value)
    return model


def test_non_finite_gradients_stop_after_patience(tmp_path: Path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", learning_rate=1e30)
    guard = NonFiniteGuard(patience=2)

    def optimizer_step(step: int, grad: float) -> None:
        guard.on_pre_optimizer_step(
            args, TrainerState(global_step=step - 1), _control(), model=_model_with_grad(grad)
        )

    optimizer_step(5, float("nan"))
    assert guard.on_step_end(args, TrainerState(global_step=5), _control()) is not None
    assert len(guard.pending) == 1  # a step that neither logs nor saves reads nothing back
    control = _control()
    control.should_save = True
    assert not guard.on_step_end(
        args, TrainerState(global_step=6), control
    ).should_save  # poisoned: no checkpoint
    optimizer_step(7, 1.0)  # the streak resets
    optimizer_step(8, float("inf"))
    optimizer_step(9, float("nan"))  # the streak reaches 2 here, read back at the next log
    optimizer_step(10, 1.0)
    control = _control()
    control.should_log = True
    with pytest.raises(NumericalError, match=r"step 9: .* for 2 consecutive") as info:
        guard.on_step_end(args, TrainerState(global_step=10), control)
    assert "trainer.learning_rate (now 1e+30)" in str(info.value)
    assert info.value.exit_code == ExitCode.NUMERICAL


def test_non_finite_gradients_are_read_back_when_training_ends(tmp_path: Path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    guard = NonFiniteGuard(patience=1)
    guard.on_pre_optimizer_step(
        args, TrainerState(global_step=2), _control(), model=_model_with_grad(float("inf"))
    )
    with pytest.raises(NumericalError, match="step 3: "):
        guard.on_train_end(args, TrainerState(global_step=3), _control())


def test_oom_advice_names_concrete_settings() -> None:
    cfg = compose_config("experiment=smoke", "trainer.gradient_accumulation_steps=3")
    advice = oom_advice(cfg)
    assert "trainer.per_device_train_batch_size=2 trainer.gradient_accumulation_steps=6" in advice
    assert "data.max_length=128 (now 256)" in advice
    assert "auto_find_batch_size" in advice


def test_cuda_oom_exits_5_with_advice(monkeypatch, caplog) -> None:
    def out_of_memory(cfg, run):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(experiment, "run_experiment", out_of_memory)
    with pytest.raises(SystemExit) as info, caplog.at_level(logging.ERROR):
        experiment.run_job(compose_config("experiment=smoke"), RunContext(Path("unused")))
    assert info.value.code == ExitCode.OUT_OF_MEMORY
    assert "trainer.per_device_train_batch_size=2" in caplog.text


def test_hydra_files_are_rewritten_without_secrets(tmp_path: Path) -> None:
    secret = "sk_live_canary_12345"
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump({"seed": 1, "hub_token": secret, "x": {"api_key": "ab"}})
    )
    (tmp_path / "overrides.yaml").write_text(yaml.safe_dump([f"+hub_token={secret}", "seed=1"]))
    hydra_cfg = {
        "hydra": {
            "overrides": {"task": [f"+hub_token={secret}", "seed=1"], "hydra": []},
            "job": {"override_dirname": "+hub_token=ab,seed=1", "env_set": {"NOTE": f"uses {secret}"}},
        }
    }
    (tmp_path / "hydra.yaml").write_text(yaml.safe_dump(hydra_cfg))
    redact_hydra_files(tmp_path, {secret})
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        assert secret not in (tmp_path / name).read_text()
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config == {"seed": 1, "hub_token": REDACTED, "x": {"api_key": REDACTED}}
    assert yaml.safe_load((tmp_path / "overrides.yaml").read_text()) == [f"+hub_token={REDACTED}", "seed=1"]
    job = yaml.safe_load((tmp_path / "hydra.yaml").read_text())["hydra"]["job"]
    assert job["override_dirname"] == f"+hub_token={REDACTED},seed=1"


def test_hydra_files_without_secrets_are_left_as_hydra_wrote_them(tmp_path: Path) -> None:
    text = "seed: 1\nmodel:\n  name_or_path: x   # spacing kept\n"
    (tmp_path / "config.yaml").write_text(text)
    redact_hydra_files(tmp_path, {"some_env_secret_value"})
    assert (tmp_path / "config.yaml").read_text() == text


def test_log_filter_scrubs_secret_values(caplog) -> None:
    logger = logging.getLogger("qlora_exp.test_secret")
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "token is %s", ("hf_abcdefgh",), None)
    SecretLogFilter({"hf_abcdefgh"}).filter(record)
    assert record.getMessage() == f"token is {REDACTED}"
    assert scrub("abc short", {"abc"}) == "abc short"  # too short to scrub as free text


def test_best_checkpoint_survives_rotation_and_is_loaded_from_its_final_path(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    args = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=4,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        per_device_train_batch_size=2,
        learning_rate=0.5,  # overshoots: a later step is worse, so the best one is not the newest
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    generator = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(2, generator=generator), "labels": torch.tensor(1.0)} for _ in range(8)]
    trainer = AtomicCheckpointTrainer(model=TinyRegressor(), args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    best = Path(str(trainer.state.best_model_checkpoint))
    assert best.parent == checkpoints and best.is_dir(), best
    verify_checkpoint(best)
    saved = json.loads((best / "trainer_state.json").read_text())
    assert saved["best_model_checkpoint"] == str(best)  # what a resumed run would load at the end
    assert not list(checkpoints.glob(".staging*"))
