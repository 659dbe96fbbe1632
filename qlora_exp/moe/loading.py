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
from transformers import PretrainedConfig, PreTrainedModel
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
    """The fused experts of a model: those the project computes, and any other 3-D weights."""

    model_class: str
    # module name -> experts module, in the layout GroupedExperts computes and in any other
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


def find_fused_experts(model: nn.Module) -> ExpertsLayout:
    """Experts modules following transformers' fused-experts interface, and other modules holding
    3-D weights (another fused-experts layout: convolutions aside, nothing else has them)."""
    layout = ExpertsLayout(type(model).__name__)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            continue
        if implements_experts_interface(module):
            layout.supported[name] = module
        elif any(
            len(logical_shape(p)) == 3 and p.is_floating_point() for p in module.parameters(recurse=False)
        ):
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
def fused_experts_loading(cfg: ModelConfig) -> Iterator[None]:
    """Within: `from_pretrained` with a BitsAndBytesConfig(load_in_4bit=True) uses FusedExpertsQuantizer."""
    quantizer = type("FusedExpertsQuantizer", (FusedExpertsQuantizer,), {"model_cfg": cfg})
    previous = AUTO_QUANTIZER_MAPPING[_BNB_4BIT]
    AUTO_QUANTIZER_MAPPING[_BNB_4BIT] = quantizer  # type: ignore[assignment]  # a Bnb4BitHfQuantizer
    try:
        yield
    finally:
        AUTO_QUANTIZER_MAPPING[_BNB_4BIT] = previous


def router_loss_kwargs(cfg: ModelConfig, hf_config: PretrainedConfig) -> dict[str, Any]:
    """Config overrides for `from_pretrained` that switch the router's load-balancing loss on.

    transformers adds `router_aux_loss_coef x aux_loss` to the loss when `output_router_logits`
    is set; the model's own coefficient unless model.router_aux_loss_coef is given.
    """
    has_router_loss = hasattr(hf_config, "output_router_logits")
    if not cfg.router_aux_loss:
        if has_router_loss:
            log.info("MoE: router load-balancing loss off (model.router_aux_loss=false)")
        return {}
    if not has_router_loss:
        raise ConfigError(
            f"model.router_aux_loss: {type(hf_config).__name__} has no router load-balancing loss "
            "(no output_router_logits). Fix: drop model.router_aux_loss for this model"
        )
    kwargs: dict[str, Any] = {"output_router_logits": True}
    if cfg.router_aux_loss_coef is not None:
        kwargs["router_aux_loss_coef"] = cfg.router_aux_loss_coef
    coef = kwargs.get("router_aux_loss_coef", getattr(hf_config, "router_aux_loss_coef", None))
    log.info(
        "MoE: router load-balancing loss on, coefficient %s: added to the training loss and to eval_loss",
        coef,
    )
    return kwargs
