"""Keep secret values out of everything a run writes.

Secrets are the values of `HF_TOKEN`, `WANDB_API_KEY` and any environment variable or config key
whose name ends in token, key, secret or password. Our own files redact by key
(`run_dir.redact_secrets`); this module covers what others write: Hydra's `.hydra/*.yaml`
(written before our code runs, so a Hydra callback rewrites them), `sys.argv` (which W&B records
in its metadata) and log records (a filter on every handler of the root logger).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from qlora_exp.run.directory import REDACTED, SECRET_KEY, redact_arg, redact_secrets

log = logging.getLogger(__name__)

# Shorter values are not scrubbed as free text (they would mangle unrelated words); keys still are.
MIN_SCRUB_LENGTH = 6
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
_DIRNAME_ITEM = re.compile(r"(^|,)([^,=]*(?:token|key|secret|password))=[^,]*", re.IGNORECASE)


def env_secret_values() -> set[str]:
    """Values of environment variables named like secrets (HF_TOKEN, WANDB_API_KEY, ...)."""
    return {value for name, value in os.environ.items() if SECRET_KEY.search(name) and value}


def config_secret_values(tree: Any) -> set[str]:
    """String values stored under secret-looking keys anywhere in a nested dict/list."""
    found: set[str] = set()
    if isinstance(tree, dict):
        for key, value in tree.items():
            if SECRET_KEY.search(str(key)) and isinstance(value, (str, int)) and str(value):
                found.add(str(value))
            else:
                found |= config_secret_values(value)
    elif isinstance(tree, list):
        for value in tree:
            found |= config_secret_values(value)
    return found


def override_secret_values(overrides: Iterable[str]) -> set[str]:
    """Values of command-line overrides whose key looks secret (`+hub_token=...`)."""
    found = set()
    for arg in overrides:
        key, sep, value = arg.partition("=")
        if sep and SECRET_KEY.search(key) and value:
            found.add(value)
    return found


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret of at least MIN_SCRUB_LENGTH characters replaced, longest first."""
    for value in sorted(secrets, key=len, reverse=True):
        if len(value) >= MIN_SCRUB_LENGTH:
            text = text.replace(value, REDACTED)
    return text


def _redact_hydra_tree(tree: Any) -> Any:
    """Key-based redaction plus Hydra's override lists and `override_dirname` string."""
    tree = redact_secrets(tree)
    hydra_node = tree.get("hydra") if isinstance(tree, dict) else None
    if isinstance(hydra_node, dict):
        for name, overrides in (hydra_node.get("overrides") or {}).items():
            hydra_node["overrides"][name] = [redact_arg(str(a)) for a in overrides or []]
        job = hydra_node.get("job") or {}
        if isinstance(job.get("override_dirname"), str):
            job["override_dirname"] = _DIRNAME_ITEM.sub(rf"\1\2={REDACTED}", job["override_dirname"])
    return tree


def redact_yaml_file(path: Path, secrets: set[str]) -> None:
    """Rewrite one of Hydra's YAML files (config, hydra, overrides, multirun) without secrets."""
    if not path.is_file():
        return
    original = path.read_text(encoding="utf-8")
    tree = yaml.safe_load(original)
    redacted = [redact_arg(str(a)) for a in tree] if isinstance(tree, list) else _redact_hydra_tree(tree)
    if redacted == tree and scrub(original, secrets) == original:
        return  # nothing secret: keep Hydra's file byte for byte
    text = scrub(yaml.safe_dump(redacted, sort_keys=False, allow_unicode=True), secrets)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def redact_hydra_files(output_dir: Path, secrets: set[str]) -> None:
    """Rewrite Hydra's config.yaml, hydra.yaml and overrides.yaml in `output_dir` without secrets."""
    for name in HYDRA_FILES:
        redact_yaml_file(output_dir / name, secrets)


class SecretLogFilter(logging.Filter):
    """Replaces known secret values in every record that passes through a handler."""

    def __init__(self, secrets: set[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message, self.secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class RedactSecrets(Callback):
    """Hydra callback (conf/config.yaml `hydra.callbacks`): runs after Hydra saved `.hydra/`."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        overrides = [str(a) for a in config.hydra.overrides.task]
        tree = OmegaConf.to_container(config, resolve=False)
        secrets = env_secret_values() | config_secret_values(tree) | override_secret_values(overrides)
        # W&B and provenance.json record the command line; Hydra has parsed it already.
        sys.argv[:] = [redact_arg(a) for a in sys.argv]
        log_filter = SecretLogFilter(secrets)
        for handler in logging.getLogger().handlers:
            handler.addFilter(log_filter)
        if config.hydra.mode == RunMode.MULTIRUN:  # the sweeper saved it before the first job
            redact_yaml_file(Path(config.hydra.sweep.dir) / "multirun.yaml", secrets)
        if config.hydra.output_subdir is not None:
            redact_hydra_files(
                Path(config.hydra.runtime.output_dir) / str(config.hydra.output_subdir), secrets
            )
