"""A completed run directory, read back: its config, tokenizer, and base model plus adapter.

`qlora-generate`, `qlora-chat` and `qlora-merge` start here. The base model comes from the run's
own `resolved_config.yaml` through the same factory functions as training, so it is loaded
(and quantized) exactly as it was trained.
"""

from __future__ import annotations

import logging
from pathlib import Path

import peft
import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from qlora_exp.errors import ConfigError, RunDirectoryError
from qlora_exp.model import load_quantized_base, resolve_attention, resolve_source
from qlora_exp.moe.lora import load_adapter
from qlora_exp.multimodal import auto_model_class
from qlora_exp.run.directory import ADAPTER_DIR, COMPLETED, FAILED, RESOLVED_CONFIG, TOKENIZER_DIR
from qlora_exp.schema import Config, to_schema

log = logging.getLogger(__name__)


def load_run_config(path: Path) -> Config:
    """The validated schema of a run from its resolved_config.yaml."""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(loaded))
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ConfigError(
            f"{path}: cannot be read as a run config ({exc}). Fix: point at a qlora-train run"
        ) from exc
    return to_schema(merged)  # type: ignore[arg-type]


class FinishedRun:
    """A run directory that qlora-train marked COMPLETED, with its adapter and tokenizer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_dir():
            raise RunDirectoryError(f"run directory not found: {path}. Fix: pass a qlora-train run directory")
        if (path / FAILED).is_file():
            reason = (path / FAILED).read_text(encoding="utf-8").strip()
            raise RunDirectoryError(f"{path} is a FAILED run ({reason}); its adapter is not a result")
        if not (path / COMPLETED).is_file():
            raise RunDirectoryError(
                f"{path} is not a finished run (no {COMPLETED} marker). "
                "Fix: wait for the run to finish, or pass the directory of a completed run"
            )
        for needed in (RESOLVED_CONFIG, f"{ADAPTER_DIR}/adapter_config.json", TOKENIZER_DIR):
            if not (path / needed).exists():
                raise RunDirectoryError(f"{path} lacks {needed}. Fix: pass the directory qlora-train wrote")
        self.config = load_run_config(path / RESOLVED_CONFIG)

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer (with the chat template) saved by the run."""
        tokenizer = AutoTokenizer.from_pretrained(self.path / TOKENIZER_DIR)
        if not tokenizer.chat_template:
            raise RunDirectoryError(f"{self.path / TOKENIZER_DIR} has no chat template")
        return tokenizer

    def load_quantized_model(self) -> peft.PeftModel:
        """Base model quantized as in training, with the run's adapter, ready for generation."""
        base = load_quantized_base(self.config.model)
        log.info("loading adapter from %s", self.path / ADAPTER_DIR)
        return load_adapter(base, self.path / ADAPTER_DIR).eval()

    def load_16bit_model(self, dtype: torch.dtype) -> peft.PeftModel:
        """Base model in `dtype` (not quantized), with the run's adapter: what a merge starts from."""
        cfg = self.config.model
        source = resolve_source(cfg)
        attention = resolve_attention(cfg, source)
        config = AutoConfig.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
        # The class the checkpoint declares, as training loaded it (multimodal ones included).
        base: PreTrainedModel = auto_model_class(config).from_pretrained(
            source,
            revision=cfg.revision,
            dtype=dtype,
            attn_implementation=attention,
            trust_remote_code=cfg.trust_remote_code,
        )
        return load_adapter(base, self.path / ADAPTER_DIR).eval()
