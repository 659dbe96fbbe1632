"""`method.init_from=RUN_DIR`: the finished run a run starts from, and the settings its adapter fixes.

Apart from the DPO trainer (qlora_exp/preference.py), so that a run imports TRL only when its method
is a preference method (TRL's import, with the W&B it pulls in, is ~1.5 s per process)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qlora_exp.errors import ConfigError, RunDirectoryError
from qlora_exp.run.directory import config_diff
from qlora_exp.run.finished import FinishedRun
from qlora_exp.schema import Config, to_plain_dict

log = logging.getLogger(__name__)

# Settings of the base model an adapter was trained on, which its continuation must share.
BASE_MODEL_KEYS = ("name_or_path", "revision")


def starting_run(cfg: DictConfig, schema: Config) -> tuple[DictConfig, FinishedRun | None]:
    """The finished run `method.init_from` names, and the config to run with, before any data or
    weights load. The base model must be the run's: an adapter only fits the model it was trained on.
    The adapter's shape (lora.*) and the chat template it learnt are the run's too: where this run
    leaves them at their defaults they are taken from the run (logged, and written into this run's
    resolved config); another value set here is refused, as it could not be honoured. (cfg, None)
    without init_from."""
    if schema.method.init_from is None:
        return cfg, None
    try:
        start = FinishedRun(Path(schema.method.init_from).expanduser())
    except RunDirectoryError as exc:
        raise ConfigError(f"method.init_from: {exc}") from exc
    trained = start.config
    for key in BASE_MODEL_KEYS:
        ours, theirs = getattr(schema.model, key), getattr(trained.model, key)
        if ours != theirs:
            raise ConfigError(
                f"method.init_from: {start.path} was trained on model.{key}={theirs!r}, this run loads "
                f"{ours!r}; an adapter only fits the base model it was trained on. Fix: set model.{key}="
                f"{theirs} (or the model preset that run used), or start from a run of this model"
            )
    ours, theirs, defaults = (adapter_settings(c) for c in (schema, trained, Config(model=schema.model)))
    taken = {key: theirs[key] for key in ours if ours[key] != theirs[key] and ours[key] == defaults[key]}
    conflicts = [key for key in ours if ours[key] != theirs[key] and key not in taken]
    if conflicts:
        raise ConfigError(
            f"method.init_from: the adapter of {start.path} was trained with "
            + ", ".join(f"{key}={theirs[key]}" for key in conflicts)
            + ", this run sets "
            + ", ".join(f"{key}={ours[key]}" for key in conflicts)
            + "; the adapter's shape and the template it learnt are the run's. Fix: leave them unset "
            "(they are taken from the run) or pass the run's values"
        )
    if taken:
        log.info("method.init_from: from %s: %s", start.path, ", ".join(f"{k}={v}" for k, v in taken.items()))
    base = config_diff(to_plain_dict(trained.model), to_plain_dict(schema.model))
    if base:
        log.warning(
            "method.init_from: %s loaded its base model with other settings (%s); continuing with this run's",
            start.path,
            ", ".join(f"model.{key}: {before} -> {now}" for key, (before, now) in base.items()),
        )
    nested: dict[str, dict[str, Any]] = {}
    for key, value in taken.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    return (OmegaConf.merge(cfg, nested) if nested else cfg), start  # type: ignore[return-value]


def adapter_settings(cfg: Config) -> dict[str, Any]:
    """What an adapter is tied to beyond its base model: its LoRA shape (dropout aside: it is off under
    DPO) and the chat template its data was rendered with."""
    lora = {f"lora.{key}": value for key, value in to_plain_dict(cfg.lora).items() if key != "dropout"}
    return {**lora, "data.chat_template": cfg.data.chat_template}
