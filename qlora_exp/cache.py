"""The project's cache directory and what lives under it: embedded checkpoints, tokenized datasets
(data/cache.py), untrained-model baselines (baseline.py) and torch.compile's artifacts.

Keys: every entry is named by `content_key`, a hash of everything its content depends on, and
written through a temporary name and renamed into place, so concurrent sweep jobs never read half
an entry and a job that changes any input gets its own entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

# Private, but the one definition of Inductor's default directory (torch 2.5+), which torch writes
# into the environment itself (`users_setting`).
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

log = logging.getLogger(__name__)

EMBEDDED_DIR = "embedded"  # built embedded checkpoints (qlora_exp/embedded/builder.py)
COMPILE_DIR = "compile"  # torch.compile's caches, one directory per library combination
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
TRITON_CACHE_ENV = "TRITON_CACHE_DIR"
# Libraries whose code ends up in compiled kernels or decides what is compiled: a new version of any
# of them gets a fresh directory (torch's own cache keys cover graphs, shapes, torch and Triton).
COMPILE_LIBRARIES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "liger-kernel")


def cache_root() -> Path:
    """Where built checkpoints and tokenized datasets live: $QLORA_EXP_CACHE, else ~/.cache/qlora_exp."""
    return Path(os.environ.get("QLORA_EXP_CACHE", Path.home() / ".cache" / "qlora_exp")).expanduser()


def content_key(**parts: Any) -> str:
    """sha256 of `parts` as canonical JSON: the name of a cache entry that depends on exactly them."""
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def library_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Installed versions of `names` (None for one that is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_json_entry(path: Path, payload: Any) -> None:
    """Write `payload` to `path` through a temporary file of its own and a rename, so a reader sees
    the whole entry or none, and two jobs writing the same entry at once do not mix their bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, ensure_ascii=False)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_json_entry(path: Path) -> Any | None:
    """The entry at `path`, or None when there is none or it cannot be read (then it is rebuilt)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("cache entry %s is unreadable (%s); computing it again", path, exc)
        return None


def compile_cache_dir() -> Path:
    """$QLORA_EXP_CACHE/compile/torch-VERSION-HASH, HASH over COMPILE_LIBRARIES' versions and CUDA's."""
    versions = {**library_versions(COMPILE_LIBRARIES), "cuda": torch.version.cuda}
    name = f"torch-{torch.__version__.replace('+', '_')}-{content_key(**versions)[:12]}"
    return cache_root() / COMPILE_DIR / name


def users_setting(env: str, ours: Path) -> str | None:
    """The value of `env` if the user chose it: neither unset, nor ours, nor what torch wrote there
    itself (Inductor stores its default directory in TORCHINDUCTOR_CACHE_DIR the first time it looks
    one up, which some imports do, and TRITON_CACHE_DIR below it when it first compiles a kernel)."""
    value = os.environ.get(env)
    default = default_cache_dir()
    if value is None or value == str(ours) or value == default or value.startswith(default + os.sep):
        return None
    return value


def configure_compile_cache(enabled: bool) -> Path | None:
    """Point torch.compile's on-disk caches (Inductor's FX graphs, AOTAutograd, autotuning, PGO, and
    Triton's kernels, Liger's included) at `compile_cache_dir()`, so that the next process, e.g. the
    next job of a sweep, loads compiled kernels instead of compiling them; returns the directory.

    Environment variables, because that is the interface torch and Triton read (at every cache
    access, so this works after `import torch`, before the first compile). A TORCHINDUCTOR_CACHE_DIR
    or TRITON_CACHE_DIR set by the user wins. `enabled=False` (model.compile_cache=false) leaves
    torch's defaults (a per-user directory under /tmp) and undoes what an earlier job of this
    process set. Idempotent.
    """
    ours = compile_cache_dir()
    owned = {INDUCTOR_CACHE_ENV: ours, TRITON_CACHE_ENV: ours / "triton"}
    if not enabled:
        for env, path in owned.items():
            if os.environ.get(env) == str(path):
                del os.environ[env]
        log.info("model.compile_cache=false: torch.compile caches where torch puts them by default")
        return None
    users = {env: value for env in owned if (value := users_setting(env, owned[env])) is not None}
    if INDUCTOR_CACHE_ENV in users:  # Triton's kernels then go below it too, unless set apart
        log.info("compile cache: %s=%s, set by you, is kept", INDUCTOR_CACHE_ENV, users[INDUCTOR_CACHE_ENV])
        return Path(users[INDUCTOR_CACHE_ENV])
    os.environ[INDUCTOR_CACHE_ENV] = str(ours)
    if TRITON_CACHE_ENV in users:
        log.info("compile cache: %s=%s, set by you, is kept", TRITON_CACHE_ENV, users[TRITON_CACHE_ENV])
    else:
        os.environ[TRITON_CACHE_ENV] = str(owned[TRITON_CACHE_ENV])
    if not (ours / "versions.json").is_file():  # what the directory's hash stands for
        write_json_entry(ours / "versions.json", library_versions(COMPILE_LIBRARIES))
    log.info("compile cache: %s (model.compile_cache=false turns it off)", ours)
    return ours
