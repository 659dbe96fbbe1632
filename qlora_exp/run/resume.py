"""Resuming a run in its own directory: refuse a changed config, find the checkpoint to load.

A rerun into an existing run directory (`hydra.run.dir=RUN_DIR`, or `resume=RUN_DIR`, which
conf/config.yaml turns into the run directory) continues from the newest complete checkpoint.
The Trainer restores optimizer, scheduler, RNG states and the data position from it, so the
resumed run computes what the uninterrupted one would have.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from qlora_exp.checkpoint import find_resumable_checkpoint
from qlora_exp.errors import ConfigError
from qlora_exp.run.directory import CHECKPOINTS_DIR, RESOLVED_CONFIG, config_diff, redact_secrets

log = logging.getLogger(__name__)

# May change between an interrupted run and its continuation: they do not change what is computed.
# Everything else (seed, model, data, LoRA, batch size, accumulation, optimizer...) does.
SAFE_TO_CHANGE = (
    "resume",
    "resume_force",
    "tracking",
    "trainer.logging_steps",
    "trainer.save_steps",
    "trainer.save_total_limit",
    "trainer.nan_guard_patience",
    "trainer.per_device_eval_batch_size",
    "trainer.dataloader_num_workers",
    "baseline_cache",  # where the step-0 evaluation comes from, not its value
    "model.compile_cache",  # where compiled kernels are kept
    "peak_memory_gb",  # what a launcher expects, not what runs
)


def register_resolvers() -> None:
    """`${qlora.resume_or:${resume},DEFAULT}`: the run directory is `resume` when it is set."""
    if not OmegaConf.has_resolver("qlora.resume_or"):
        OmegaConf.register_new_resolver(
            "qlora.resume_or", lambda value, default: default if value is None else value
        )


def _matters(key: str) -> bool:
    return not any(key == safe or key.startswith(safe + ".") for safe in SAFE_TO_CHANGE)


def changed_settings(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every setting that changes the result, sorted by key."""
    return [
        f"{key}: {old!r} -> {new!r}"
        for key, (old, new) in config_diff(previous, current).items()
        if _matters(key)
    ]


def prepare_resume(run_dir: Path, resolved: dict[str, Any], resume: str | None, force: bool) -> Path | None:
    """The checkpoint to resume from (None: start at step 0); refuses a changed config unless forced.

    Call after claiming the run directory and before rewriting its resolved_config.yaml.
    """
    previous_file = run_dir / RESOLVED_CONFIG
    if resume is not None:
        if Path(resume).expanduser().resolve() != run_dir.resolve():
            raise ConfigError(
                f"resume={resume} but the run directory is {run_dir}. Fix: pass only resume=RUN_DIR "
                "(or only hydra.run.dir=RUN_DIR); in a multirun, rerun with the same hydra.sweep.dir"
            )
        if not previous_file.is_file():
            raise ConfigError(
                f"resume={resume}: no run there (no {RESOLVED_CONFIG}). Fix: name a run directory"
            )
    if not previous_file.is_file():
        return None
    previous = yaml.safe_load(previous_file.read_text(encoding="utf-8")) or {}
    changes = changed_settings(previous, redact_secrets(resolved))
    if changes and not force:
        raise ConfigError(
            f"cannot resume {run_dir}: settings that change the result differ from its {RESOLVED_CONFIG}: "
            + "; ".join(changes)
            + ". Fix: rerun with the original settings, use a new hydra.run.dir, or pass resume_force=true"
        )
    if changes:
        log.warning("resume_force=true: resuming %s although these differ: %s", run_dir, "; ".join(changes))
    checkpoint = find_resumable_checkpoint(run_dir / CHECKPOINTS_DIR)
    if checkpoint is None:
        log.warning("no complete checkpoint in %s: this rerun starts from step 0", run_dir / CHECKPOINTS_DIR)
    else:
        log.info("resuming %s from %s", run_dir, checkpoint)
    return checkpoint
