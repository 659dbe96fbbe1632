"""Atomic, verifiable Trainer checkpoints and discovery of the newest complete one.

The Trainer's own `_save_checkpoint` writes adapter (safetensors), optimizer, scheduler, RNG
states and trainer state straight into `checkpoint-N/`: a crash mid-save leaves a directory that
looks like a checkpoint, and `get_last_checkpoint` would pick it (transformers added atomic saves
and reverted them, twice). An `on_save` callback that only marks completion is not enough: the
Trainer has already rotated (deleted) older checkpoints by then, so a crash between rotation and
marker can leave no complete checkpoint at all. So we keep the Trainer's writer (its file set is
exactly what `resume_from_checkpoint` reads) but point it at a staging directory on the same
filesystem, then fsync, write a manifest (sizes + SHA-256 of every file), rename into place, and
rotate only complete checkpoints. Loading verifies the manifest, so a truncated or corrupted
checkpoint is skipped with a warning instead of being loaded.

Safety of loading: adapter weights are safetensors; optimizer.pt, scheduler.pt and rng_state.pth
are the Trainer's torch.save files, which it reads with `torch.load(weights_only=True)` (no
arbitrary unpickling). training_args.bin is written by the Trainer but never loaded on resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

log = logging.getLogger(__name__)

MANIFEST = "qlora_checkpoint.json"
STAGING_PREFIX = ".staging-"
# Written by the Trainer into every full checkpoint; resuming needs all of them.
REQUIRED_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors")
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_HASH_CHUNK = 1 << 20


class CheckpointInvalid(Exception):
    """A checkpoint directory that must not be loaded (reason in the message)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_step(path: Path) -> int | None:
    """The global step in a `checkpoint-N` directory name, or None for other names."""
    match = _CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else None


def write_manifest(checkpoint: Path) -> dict[str, Any]:
    """fsync every file, then record its size and SHA-256 in the manifest (itself fsynced)."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST):
        _fsync_path(path)
        files[path.relative_to(checkpoint).as_posix()] = {
            "size": path.stat().st_size,
            "sha256": _sha256(path),
        }
    manifest = {"format": 1, "files": files}
    target = checkpoint / MANIFEST
    with target.open("w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_path(checkpoint)
    return manifest


def verify_checkpoint(checkpoint: Path) -> None:
    """Raise CheckpointInvalid unless every file in the manifest is present, whole and unchanged."""
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointInvalid(f"no {MANIFEST} (the save never finished)")
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointInvalid(f"unreadable {MANIFEST}: {exc}") from exc
    missing = [name for name in REQUIRED_FILES if name not in files]
    if not any(name in files for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise CheckpointInvalid(f"lacks {', '.join(missing)}")
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointInvalid(f"{name} is missing")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointInvalid(f"{name} has {size} bytes, expected {expected['size']} (truncated?)")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointInvalid(f"{name} does not match its SHA-256 (corrupted)")


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """`checkpoint-N` directories as (N, path), newest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in checkpoints_dir.iterdir() if p.is_dir()]
    return sorted(((step, p) for step, p in found if step is not None), reverse=True)


def find_resumable_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is skipped with a warning."""
    for _, path in list_checkpoints(checkpoints_dir):
        try:
            verify_checkpoint(path)
        except CheckpointInvalid as exc:
            log.warning("skipping checkpoint %s: %s", path, exc)
            continue
        return path
    return None


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Manifest + fsync the staged checkpoint, then rename it to `final` (replacing a stale one)."""
    write_manifest(staged)
    if final.exists():  # a torn or older copy of this step, e.g. redone after resuming from further back
        stale = final.with_name(f"{STAGING_PREFIX}stale-{final.name}")
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(final, stale)
        shutil.rmtree(stale)
    os.rename(staged, final)
    _fsync_path(final.parent)


def rotate_checkpoints(checkpoints_dir: Path, keep: int, best: Path | None = None) -> None:
    """Delete complete checkpoints beyond the newest `keep` (by step), sparing `best`; torn ones are
    left for `publish`."""
    complete = []
    for _, path in list_checkpoints(checkpoints_dir):
        if (path / MANIFEST).is_file():
            complete.append(path)
    for path in complete[keep:]:
        if best is not None and path == best:
            continue
        log.info("deleting old checkpoint %s (trainer.save_total_limit=%d)", path, keep)
        shutil.rmtree(path)


def tokens_before(checkpoint: Path | None) -> int:
    """Input tokens already seen when training resumes from `checkpoint` (0 for a fresh start)."""
    if checkpoint is None:
        return 0
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return int(state.get("num_input_tokens_seen", 0))


def logged_train_loss(state: TrainerState) -> float:
    """Mean training loss over every logged step of the run, including steps before a resume."""
    total, previous = 0.0, 0
    for entry in state.log_history:
        if "loss" in entry and entry["step"] > previous:
            # Each entry averages the steps since the previous one.
            total += entry["loss"] * (entry["step"] - previous)
            previous = int(entry["step"])
    return total / previous if previous else math.nan


class AtomicCheckpointMixin:
    """Makes a transformers Trainer's checkpoints atomic and verifiable (see the module docstring).

    Mix in before the Trainer class: `class T(AtomicCheckpointMixin, Trainer)`. The newest
    `args.save_total_limit` complete checkpoints are kept; the Trainer's own rotation only ever
    sees the staging directory, so it cannot delete a complete checkpoint for a torn one.
    """

    _staging_root: Path | None = None

    def _get_output_dir(self, trial: Any) -> str:
        if self._staging_root is not None:
            return str(self._staging_root)
        return super()._get_output_dir(trial)  # type: ignore[misc]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        trainer: Trainer = self  # type: ignore[assignment]
        final_root = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
        # One staging name per step (not per process): every rank writes its RNG file into it.
        staging_root = final_root / f"{STAGING_PREFIX}{name}"
        if trainer.args.should_save:  # staging left by a crash mid-save; we hold the run directory
            for leftover in final_root.glob(f"{STAGING_PREFIX}*"):
                shutil.rmtree(leftover)
        trainer.accelerator.wait_for_everyone()
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            self._staging_root = None
        # The Trainer looked for the best checkpoint (load_best_model_at_end) under the staging
        # directory: point it at its final place, in the state and in the staged trainer_state.json.
        best = final_root / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.best_global_step}"
        if trainer.state.best_global_step:
            trainer.state.best_model_checkpoint = str(best)
            if trainer.args.should_save:
                trainer.state.save_to_json(str(staging_root / name / "trainer_state.json"))
        trainer.accelerator.wait_for_everyone()
        if trainer.args.should_save:
            publish_checkpoint(staging_root / name, final_root / name)
            staging_root.rmdir()
            if trainer.args.save_total_limit:
                rotate_checkpoints(
                    final_root,
                    trainer.args.save_total_limit,
                    best if trainer.state.best_global_step else None,
                )
            log.info("checkpoint %s saved (step %d)", final_root / name, trainer.state.global_step)
        trainer.accelerator.wait_for_everyone()


class AtomicCheckpointTrainer(AtomicCheckpointMixin, Trainer):
    """transformers' Trainer with atomic, verified checkpoints."""
