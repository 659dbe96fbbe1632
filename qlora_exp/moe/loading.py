"""Loading a MoE model for QLoRA: fused experts found, refused or converted, before weights load.

transformers' bitsandbytes quantizer replaces `nn.Linear` modules on the meta model and quantizes
each weight as it loads. `FusedExpertsQuantizer` is that quantizer plus the fused experts: before
weights load it finds them, refuses a layout the project cannot quantize (naming the model class),
keeps routers out of 4 bits, gives each supported experts module the grouped forward and, unless
`model.quantize_experts=false`, 4-bit placeholders that the same loader quantizes layer by layer
(so the 16-bit experts never all sit in memory, as the Linear weights never do). It stands in for
transformers' own quantizer during one `from_pretrained` call through transformers' quantizer
registry (AUTO_QUANTIZER_MAPPING, the table `register_quantizer` fills); the config stays an
ordinary BitsAndBytesConfig, so peft and transformers see a usual bitsandbytes 4-bit model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from qlora_exp.errors import ConfigError
from qlora_exp.moe.experts import (
    GroupedExperts,
    implements_experts_interface,
    is_quantized,
    logical_shape,
    quantize_placeholders,
    to_grouped_experts,
)
from qlora_exp.schema import ModelConfig

log = logging.getLogger(__name__)

# transformers' registry key for 4-bit bitsandbytes (AutoHfQuantizer.from_config appends "_4bit").
_BNB_4BIT = "bitsandbytes_4bit"


@dataclass(frozen=True)
class ExpertsLayout:
    """The fused experts of a model: those in the layout GroupedExperts computes, and any others."""

    model_class: str
    # module name -> experts module
    supported: dict[str, nn.Module] = field(default_factory=dict)
    unsupported: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def any(self) -> bool:
        """True when the model has fused expert weights of either kind."""
        return bool(self.supported or self.unsupported)

    @property
    def all(self) -> dict[str, nn.Module]:
        """Every experts module, by name."""
        return {**self.supported, **self.unsupported}


# Where configs give the number of experts per MoE layer.
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _expert_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    text_config = config.get_text_config(decoder=True) if config is not None else None
    counts = [getattr(text_config, key, None) for key in _EXPERT_COUNT_KEYS]
    return next((count for count in counts if isinstance(count, int) and count > 1), None)


def _holds_fused_experts(module: nn.Module, expert_count: int | None) -> bool:
    """A module with a 3-D weight stacked over the experts (an experts class, or the model's expert
    count as first dimension): other 3-D weights (a vision tower's position table) are not experts."""
    stacked = [
        logical_shape(p)
        for p in module.parameters(recurse=False)
        if p.is_floating_point() and len(logical_shape(p)) == 3
    ]
    return bool(stacked) and (
        "Expert" in type(module).__name__ or any(shape[0] == expert_count for shape in stacked)
    )


def find_fused_experts(model: nn.Module) -> ExpertsLayout:
    """Experts modules following transformers' fused-experts interface, and experts stored fused in
    another layout (which the project cannot quantize)."""
    layout = ExpertsLayout(type(model).__name__)
    expert_count = _expert_count(model)
    for name, module in model.named_modules():
        if implements_experts_interface(module):
            layout.supported[name] = module
        elif _holds_fused_experts(module, expert_count):
            layout.unsupported[name] = module
    return layout


def check_experts(layout: ExpertsLayout, cfg: ModelConfig) -> None:
    """Refuse what would not be QLoRA, or a setting that would change nothing, before weights load."""
    if not layout.any and not cfg.quantize_experts:
        raise ConfigError(
            f"model.quantize_experts=false: {layout.model_class} has no fused experts, so the setting "
            "changes nothing. Fix: drop model.quantize_experts=false"
        )
    if not cfg.quantize_experts:
        return
    if layout.unsupported:
        where = ", ".join(
            f"{name} ({type(m).__name__})" for name, m in sorted(layout.unsupported.items())[:3]
        )
        raise ConfigError(
            f"model.quantize_experts: {layout.model_class} stores its experts as fused 3-D weights in a "
            f"layout qlora-exp cannot quantize: {where}. Only experts modules built on transformers' "
            "fused-experts interface (`use_experts_implementation`: Qwen3-MoE, Qwen3.5-MoE, Gemma-4, "
            "GPT-OSS, Mixtral, OLMoE, ...) are stored in 4 bits. Fix: model.quantize_experts=false to "
            "train with these experts unquantized (16-bit, far more memory), or another model"
        )


def router_names(layout: ExpertsLayout, model: nn.Module) -> list[str]:
    """Linear routers in the experts' block (a linear map from the hidden size to one logit per
    expert): kept out of 4 bits and out of LoRA's `all-linear`."""
    names = []
    for experts_name, experts in layout.all.items():
        num_experts = next(logical_shape(p)[0] for p in experts.parameters() if len(logical_shape(p)) == 3)
        block_name = experts_name.rpartition(".")[0]
        block = model.get_submodule(block_name) if block_name else model
        names += [
            name
            for name, module in block.named_modules(prefix=block_name)
            if isinstance(module, nn.Linear) and module.out_features == num_experts
        ]
    return sorted(set(names))


class FusedExpertsQuantizer(Bnb4BitHfQuantizer):
    """transformers' 4-bit bitsandbytes quantizer that also handles fused experts (module docstring)."""

    model_cfg: ClassVar[ModelConfig]  # set per load by `fused_experts_loading`

    def _process_model_before_weight_loading(  # type: ignore[override]  # Bnb4BitHfQuantizer's own
        self, model: PreTrainedModel, device_map: Any, **kwargs: Any
    ) -> None:
        config = self.quantization_config
        layout = find_fused_experts(model)
        check_experts(layout, self.model_cfg)
        configure_router_loss(model, self.model_cfg)
        routers = router_names(layout, model)
        if routers:
            # An explicit skip list replaces transformers' default one (the LM head): keep both.
            config.llm_int8_skip_modules = sorted(
                {*(config.llm_int8_skip_modules or get_keys_to_not_convert(model)), *routers}
            )
        super()._process_model_before_weight_loading(model, device_map, **kwargs)
        for module in layout.supported.values():
            to_grouped_experts(module, config.bnb_4bit_compute_dtype)
            if self.model_cfg.quantize_experts:
                quantize_placeholders(module, config)  # type: ignore[arg-type]
        log_experts(layout, self.model_cfg)

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs: Any) -> bool:
        module, name = get_module_from_name(model, param_name)
        if isinstance(module, GroupedExperts):
            return is_quantized(getattr(module, name))
        return super().param_needs_quantization(model, param_name, **kwargs)


def log_experts(layout: ExpertsLayout, cfg: ModelConfig) -> None:
    """Say how the experts are stored: one line per load of a MoE model."""
    if not layout.any:
        return
    classes = sorted({type(m).__name__ for m in layout.all.values()})
    count = len(layout.all)
    if cfg.quantize_experts:
        log.info(
            "MoE: %d experts modules (%s) stored in 4 bits (%s%s), dequantized per layer in forward and "
            "backward; routers in 16/32 bits",
            count,
            ", ".join(classes),
            cfg.bnb_4bit_quant_type,
            " + double quantization" if cfg.bnb_4bit_use_double_quant else "",
        )
    else:
        log.warning(
            "MoE: model.quantize_experts=false: %d experts modules (%s) stay unquantized, in the "
            "compute dtype: this is not QLoRA for the experts and takes ~4x their 4-bit memory",
            count,
            ", ".join(classes),
        )


@contextmanager
def experts_out_of_upcast(model: nn.Module) -> Iterator[None]:
    """Within, unquantized fused expert weights are not among `model.parameters()`, then return frozen.

    peft's `prepare_model_for_kbit_training` casts every 16-bit parameter to fp32 (precision.py then
    casts them back to the compute dtype when model.upcast_unquantized_params=false): unquantized
    experts (model.quantize_experts=false) would first take 4 bytes per parameter, 116 GB for
    Qwen3-30B-A3B. They sit that cast out; frozen weights gain nothing from fp32.
    """
    held = [
        (module, name, param)
        for module in find_fused_experts(model).all.values()
        for name, param in module.named_parameters(recurse=False)
        if len(param.shape) == 3 and not is_quantized(param)
    ]
    for module, name, _ in held:
        del module._parameters[name]
    try:
        yield
    finally:
        for module, name, param in held:
            param.requires_grad_(False)
            module._parameters[name] = param


@contextmanager
def fused_experts_loading(cfg: ModelConfig) -> Iterator[None]:
    """Within: `from_pretrained` with a BitsAndBytesConfig(load_in_4bit=True) uses FusedExpertsQuantizer."""
    quantizer = type("FusedExpertsQuantizer", (FusedExpertsQuantizer,), {"model_cfg": cfg})
    previous = AUTO_QUANTIZER_MAPPING[_BNB_4BIT]
    AUTO_QUANTIZER_MAPPING[_BNB_4BIT] = quantizer  # type: ignore[assignment]  # a Bnb4BitHfQuantizer
    try:
        yield
    finally:
        AUTO_QUANTIZER_MAPPING[_BNB_4BIT] = previous


def configure_router_loss(model: PreTrainedModel, cfg: ModelConfig) -> None:
    """Switch the router's load-balancing loss on or off as configured, before weights load.

    transformers adds `router_aux_loss_coef x aux_loss` to the loss when the text config's
    `output_router_logits` is set (the model's own coefficient unless model.router_aux_loss_coef is
    given); causal-LM classes copy the coefficient at construction, so it is set on them too.
    """
    text_config = model.config.get_text_config(decoder=True)
    if not hasattr(text_config, "output_router_logits"):
        if cfg.router_aux_loss:
            raise ConfigError(
                f"model.router_aux_loss: {type(model).__name__} has no router load-balancing loss "
                "(its config has no output_router_logits). Fix: drop model.router_aux_loss for this model"
            )
        return
    text_config.output_router_logits = cfg.router_aux_loss
    if not cfg.router_aux_loss:
        log.info("MoE: router load-balancing loss off (model.router_aux_loss=false)")
        return
    if cfg.router_aux_loss_coef is not None:
        text_config.router_aux_loss_coef = cfg.router_aux_loss_coef
        for module in model.modules():
            if hasattr(module, "router_aux_loss_coef"):
                # an attribute the causal-LM class sets in __init__ (nn.Module's typing knows no such)
                setattr(module, "router_aux_loss_coef", cfg.router_aux_loss_coef)  # noqa: B010
    log.info(
        "MoE: router load-balancing loss on, coefficient %s: added to the training loss and to eval_loss",
        text_config.router_aux_loss_coef,
    )
