"""Text-only fine-tuning of multimodal checkpoints (Gemma-3 4B/12B/27B, Gemma-4, ...).

Their class (e.g. `Gemma3ForConditionalGeneration`) holds a language model beside vision (and audio)
towers and the projectors that feed them into it. Training on text uses only the language model, so:

- the towers and projectors stay out of 4-bit quantization (bitsandbytes' `llm_int8_skip_modules`):
  they receive no gradient and run in the compute dtype, as the checkpoint ships them, rather than
  being degraded by NF4 for nothing. They are frozen like every base weight;
- LoRA adapts only the language model: `all-linear`, and names such as `q_proj` that the towers
  share (SigLIP's attention has them too), are kept out of the towers by peft's `exclude_modules`;
- `model.attn_implementation` is the language model's attention; the towers take eager
  (`attention_implementations`), which every tower supports and which text-only training never runs.

Which modules are "not text" is read from the model's own structure (the siblings of the decoder
that `get_decoder()` returns), so any architecture with transformers' multimodal layout is covered
without a list of names per family.
"""

from __future__ import annotations

import logging
import re

import peft
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)
from transformers.quantizers.base import get_keys_to_not_convert

from qlora_exp.errors import ConfigError

log = logging.getLogger(__name__)

# The towers' attention: the one implementation every transformers tower has (Gemma-4's audio tower
# has no SDPA or flex path in transformers 5.24), and text-only batches never run a tower.
TOWER_ATTN_IMPLEMENTATION = "eager"

AutoClass = type[AutoModelForCausalLM] | type[AutoModelForImageTextToText]


def is_multimodal(config: PretrainedConfig) -> bool:
    """True when the checkpoint's config wraps a separate text config (vision/audio towers beside it)."""
    return config.get_text_config(decoder=True) is not config


def attention_implementations(config: PretrainedConfig, text_implementation: str) -> str | dict[str, str]:
    """transformers' `attn_implementation` for a checkpoint whose language model takes
    `text_implementation`: that string for a text model; for a multimodal one, a dict by sub-config
    (transformers' own form) with the top-level model and the text config on it and every tower's
    config on TOWER_ATTN_IMPLEMENTATION. One string would reach every tower, and a tower without that
    implementation fails the load."""
    if not is_multimodal(config):
        return text_implementation
    text_config = config.get_text_config(decoder=True)
    implementations = {"": text_implementation}
    for key in config.sub_configs:
        if getattr(config, key, None) is not None:
            is_text = getattr(config, key) is text_config
            implementations[key] = text_implementation if is_text else TOWER_ATTN_IMPLEMENTATION
    return implementations


def auto_model_class(config: PretrainedConfig) -> AutoClass:
    """The auto class that builds the class the checkpoint declares: the causal-LM mapping (which
    transformers points at the multimodal class for Gemma-3/4), else the image-text-to-text one."""
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    raise ConfigError(
        f"model.name_or_path: a {config.model_type!r} checkpoint ({config.architectures}) is neither a "
        "causal language model nor an image-text-to-text model in this transformers. Fix: use a "
        "text-generation checkpoint, or upgrade transformers if the architecture is newer"
    )


def non_text_modules(model: PreTrainedModel) -> list[str]:
    """Qualified names of the modules beside the language model (towers, projectors); none for a
    text-only model."""
    if not is_multimodal(model.config):
        return []
    decoder = model.get_decoder()
    decoder_name = next(name for name, module in model.named_modules() if module is decoder)
    parent_name = decoder_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name)
    prefix = f"{parent_name}." if parent_name else ""
    return [prefix + name for name, child in parent.named_children() if child is not decoder]


def skeleton(config: PretrainedConfig, trust_remote_code: bool) -> PreTrainedModel:
    """The checkpoint's model on the meta device: its module tree, no memory, no weights read."""
    with torch.device("meta"):
        return auto_model_class(config).from_config(config, trust_remote_code=trust_remote_code)


def quantization_skips(config: PretrainedConfig, trust_remote_code: bool) -> list[str] | None:
    """`llm_int8_skip_modules` for a multimodal checkpoint: transformers' own defaults (output head,
    tied weights) plus the non-text modules; None (transformers' defaults alone) for a text model.
    The defaults are added here because passing any skip list replaces them."""
    if not is_multimodal(config):
        return None
    model = skeleton(config, trust_remote_code)
    towers = non_text_modules(model)
    log.info("multimodal checkpoint: %s left unquantized and untrained (text-only fine-tuning)", towers)
    return sorted({*get_keys_to_not_convert(model), *towers})


def loading_plan(
    source: str, revision: str | None, trust_remote_code: bool
) -> tuple[AutoClass, list[str] | None]:
    """The auto class that loads the class `source` declares, and the modules to keep out of 4 bits
    (`quantization_skips`)."""
    config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    return auto_model_class(config), quantization_skips(config, trust_remote_code)


def _targeted(name: str, module: torch.nn.Module, targets: str | set[str] | list[str] | None) -> bool:
    """Whether peft would adapt module `name` for `target_modules` (its matching rules: `all-linear`,
    a regex string matched whole, or names matched whole or as the last dotted parts)."""
    if targets == "all-linear":
        return isinstance(module, torch.nn.Linear)
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith("." + target) for target in targets or ())


def exclude_non_text(config: peft.LoraConfig, model: PreTrainedModel) -> peft.LoraConfig:
    """`config` with LoRA kept off `model`'s non-text modules (peft's `exclude_modules`) where its
    targets would reach into them: `all-linear`, or a name a tower shares (SigLIP's `q_proj`)."""
    towers = non_text_modules(model)
    reached = [
        name
        for name, module in model.named_modules()
        if any(name.startswith(tower + ".") for tower in towers)
        and _targeted(name, module, config.target_modules)
    ]
    if reached:
        config.exclude_modules = rf"({'|'.join(map(re.escape, towers))})(\..*)?"
        log.info("LoRA kept off %d layers of %s (text-only fine-tuning)", len(reached), towers)
    return config
