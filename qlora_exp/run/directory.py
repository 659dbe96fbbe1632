"""The run directory: claimed by one process, provenance first, COMPLETED or FAILED last."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from qlora_exp.cache import library_versions
from qlora_exp.errors import RequeuedExit, RunDirectoryError
from qlora_exp.run.distributed import is_main_process

log = logging.getLogger(__name__)

# The run-directory contract (README, "Where outputs go"): every file a run writes, named once.
# (train.log is named in conf/config.yaml, where Hydra's job logging is configured.)
COMPLETED = "COMPLETED"  # the last file a successful run writes
FAILED = "FAILED"  # holds the reason; removed when a rerun reopens the directory
LOCK = ".run.lock"
RESOLVED_CONFIG = "resolved_config.yaml"
PROVENANCE = "provenance.json"
DATA_STATS = "data_stats.json"
METRICS = "metrics.json"
HISTORY_FILE = "log_history.json"  # the Trainer's log history (qlora_exp.tracking keeps it current)
SAMPLES_FILE = "samples.jsonl"  # held-out generations (qlora_exp.generation)
ADAPTER_DIR = "adapter"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS_DIR = "checkpoints"
WANDB_RUN_ID_FILE = "wandb_run_id.txt"  # the W&B run a resumed run continues
REDACTED = "<redacted>"
SECRET_KEY = re.compile(r"(token|key|secret|password)$", re.IGNORECASE)
TRACKED_PACKAGES = (
    "qlora-exp",
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "tokenizers",
    "hydra-core",
    "omegaconf",
    "wandb",
)


def redact_secrets(value: Any) -> Any:
    """A copy of nested dicts/lists where every key ending in token/key/secret/password is redacted."""
    if isinstance(value, dict):
        return {k: REDACTED if SECRET_KEY.search(str(k)) else redact_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_secrets(v) for v in value]
    return value


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"a.b.c": leaf}; lists stay leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


ABSENT = "<absent>"  # stands for a key one config has and the other lacks


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} for every leaf that differs between two nested configs,
    sorted by key; a key only one side has shows ABSENT on the other. Resume's "what changed",
    the sweep's "same job?" and comparisons of two runs all read this."""
    flat_old, flat_new = flatten(old), flatten(new)
    return {
        key: (flat_old.get(key, ABSENT), flat_new.get(key, ABSENT))
        for key in sorted(flat_old.keys() | flat_new.keys())
        if flat_old.get(key, ABSENT) != flat_new.get(key, ABSENT)
    }


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _git_state(repo: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    return library_versions(TRACKED_PACKAGES)


def _device() -> dict[str, Any]:
    if torch.cuda.is_available():
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
        }
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "count": os.cpu_count()}


class RunDirectory:
    """One run's directory. Use as a context manager: claims it, marks FAILED on any exception.

    In a distributed run every rank opens the same directory; only rank 0 (`writer`) writes to it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer = is_main_process()
        self._lock = path / LOCK

    def __enter__(self) -> RunDirectory:
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.writer:
            return self
        self._claim()
        if (self.path / COMPLETED).is_file():
            # Rerunning into a finished run would overwrite its results: they stay as they are.
            self._lock.unlink(missing_ok=True)
            raise RunDirectoryError(
                f"run directory {self.path} holds a COMPLETED run; nothing to resume. "
                "Fix: choose a new hydra.run.dir (or leave it unset)"
            )
        for marker in (COMPLETED, FAILED):
            (self.path / marker).unlink(missing_ok=True)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if not self.writer:
            return
        if isinstance(exc, RequeuedExit):  # not a failure: the job runs again and resumes
            self.mark_failed(str(exc), requeued=True)
        elif exc is not None:
            self.mark_failed(f"{type(exc).__name__}: {exc}")
        self._lock.unlink(missing_ok=True)

    def _claim(self) -> None:
        # O_EXCL makes two processes that picked the same directory fail instead of sharing it. The
        # lock names its process and host ("PID HOST"): a process id means something only on its own
        # host, and a cluster may requeue a job onto another node of the same shared filesystem.
        here = socket.gethostname()
        try:
            fd = os.open(self._lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid, _, host = self._lock.read_text().strip().partition(" ")
            host = host or here  # a lock of an older version names no host
            if host == here and pid.isdigit() and _pid_alive(int(pid)):
                raise RunDirectoryError(
                    f"run directory {self.path} is in use by process {pid}. "
                    "Fix: wait for it, or choose another hydra.run.dir"
                ) from None
            owner = f"dead process {pid}" if host == here else f"process {pid} of host {host}"
            log.warning("removing stale lock left by %s in %s", owner, self.path)
            self._lock.unlink(missing_ok=True)
            fd = os.open(self._lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()} {here}")

    def file(self, name: str) -> Path:
        """Path of a file inside the run directory."""
        return self.path / name

    def write_json(self, name: str, payload: Any) -> None:
        """Atomically write `payload` as JSON to `name`."""
        if not self.writer:
            return
        write_json_atomic(self.path / name, payload)

    def write_resolved_config(self, config: dict[str, Any]) -> None:
        """resolved_config.yaml: interpolations resolved, secrets redacted."""
        if not self.writer:
            return
        text = yaml.safe_dump(redact_secrets(config), sort_keys=False, allow_unicode=True)
        (self.path / RESOLVED_CONFIG).write_text(text, encoding="utf-8")

    def write_provenance(self, **extra: Any) -> None:
        """provenance.json: code version, packages, device, command; merged with earlier fields."""
        if not self.writer:
            return
        path = self.path / PROVENANCE
        current = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if not current:
            current = {
                "git": _git_state(Path(__file__).resolve().parent.parent),
                "packages": package_versions(),
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "device": _device(),
                "argv": [redact_arg(a) for a in sys.argv],
            }
        current.update(extra)
        write_json_atomic(path, current)

    def mark_completed(self) -> None:
        """Written last: everything else in the directory is final."""
        if not self.writer:
            return
        (self.path / COMPLETED).write_text("ok\n", encoding="utf-8")

    def mark_failed(self, reason: str, requeued: bool = False) -> None:
        """Mark the run FAILED with its reason (the adapter, if any, is not a result). A `requeued`
        run carries the marker only until its requeued job reopens the directory."""
        if not self.writer:
            return
        (self.path / COMPLETED).unlink(missing_ok=True)
        (self.path / FAILED).write_text(reason.strip() + "\n", encoding="utf-8")
        if requeued:
            log.warning("run %s; it resumes when the job runs again (FAILED until then)", reason)
        else:
            log.error("run FAILED: %s (marked in %s)", reason, self.path)


def redact_arg(arg: str) -> str:
    """A `key=value` command-line override with the value redacted when the key looks secret."""
    key, sep, _ = arg.partition("=")
    return f"{key}={REDACTED}" if sep and SECRET_KEY.search(key) else arg


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
