"""LoRA targets by kind (attention, experts, all), LoRA on fused experts, counts per kind.

peft adapts a fused 3-D expert weight through `target_parameters` and its `ParamWrapper`, which
adds the whole delta B A to the weight for every forward: that needs the weight itself as a
16-bit tensor (it cannot be 4-bit), materialises a second tensor the size of all of a layer's
experts, and cannot apply dropout (x cannot be factored out of (W + B A) x). `ExpertsLora` keeps
peft's ParamWrapper for everything but the forward: the same adapter layout, state-dict keys,
saving, loading and trainable-parameter handling (an adapter trained here loads onto the 16-bit
model with plain peft, which is how `qlora-merge` folds it in). Its forward hands the factors to
the experts module (experts.GroupedExperts), which adds scaling * B_e A_e dropout(x) per expert,
on the 4-bit weights' groups. It is registered through peft's custom-module API for the grouped
experts only; experts in a layout they cannot compute (kept unquantized with
model.quantize_experts=false) get peft's own wrapper, and with it its refusal of dropout.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from peft.tuners.lora.layer import ParamWrapper
from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
from torch import nn
from transformers import PreTrainedModel

from qlora_exp.errors import ConfigError
from qlora_exp.moe.experts import (
    ExpertLoraFactors,
    GroupedExperts,
    is_quantized,
    logical_shape,
)
from qlora_exp.moe.loading import ExpertsLayout, find_fused_experts, router_names

log = logging.getLogger(__name__)

# lora.target_modules words (joined with `+`); any other entry names modules, as in peft.
ALL = ("all-linear", "all")  # peft's shorthand for every linear layer but the head, plus the experts
ATTENTION = "attention"  # the linear layers inside attention modules
EXPERTS = "experts"  # the fused expert weights
PRESETS = (*ALL, ATTENTION, EXPERTS)


def _without_dropout(config: peft.LoraConfig) -> peft.LoraConfig:
    quiet = copy.copy(config)
    quiet.lora_dropout = 0.0
    return quiet


class ExpertsLora(ParamWrapper):
    """peft's ParamWrapper on a grouped experts weight, with a factored forward (module docstring)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        parameter_name: str,
        config: peft.LoraConfig,
        **kwargs: Any,
    ) -> None:
        # ParamWrapper refuses dropout because its own forward cannot apply it; this one can.
        super().__init__(base_layer, adapter_name, parameter_name, _without_dropout(config), **kwargs)
        self._set_dropout(adapter_name, config.lora_dropout)

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: int, config: peft.LoraConfig, **kwargs: Any
    ) -> None:
        super().update_layer(adapter_name, r, lora_alpha, _without_dropout(config), **kwargs)
        self._set_dropout(adapter_name, config.lora_dropout)

    def _set_dropout(self, adapter_name: str, p: float) -> None:
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # ParamWrapper reads the parameter's shape; a 4-bit weight is stored flat.
        num_experts, in_features, out_features = logical_shape(self.get_param())
        self.num_experts, self._param_ndim = num_experts, 3
        return in_features, out_features

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if is_quantized(self.get_param()):
            raise ConfigError(
                "merging LoRA into 4-bit experts would round the update away. Fix: qlora-merge, which "
                "folds the adapter into the 16-bit base model"
            )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return self.base_layer(x, *args, **kwargs)
        factors = tuple(
            ExpertLoraFactors(
                a=_weight(self.lora_A[name]),
                b=_weight(self.lora_B[name]),
                scaling=self.scaling[name],
                dropout=self.lora_dropout[name],
                num_experts=self.num_experts,
            )
            for name in self.active_adapters
            if name in self.lora_A
        )
        experts = self.get_base_layer()
        assert isinstance(experts, GroupedExperts)
        with experts.lora_applied(self.parameter_name, factors):
            return self.base_layer(x, *args, **kwargs)


def _weight(layer: nn.Module) -> torch.Tensor:
    assert isinstance(layer, nn.Linear)  # peft's LoRA factors
    return layer.weight


# peft 0.21 recognises its parameter wrappers by class name when it nests the second expert weight's
# wrapper around the first (tuners_utils' _inject_parameters); this class must pass as one.
ExpertsLora.__name__ = ParamWrapper.__name__


def expert_parameters(layout: ExpertsLayout) -> list[str]:
    """peft `target_parameters` for every fused expert weight (`experts.gate_up_proj`, ...)."""
    names = set()
    for module_name, module in layout.all.items():
        leaf = module_name.rpartition(".")[2]
        names |= {
            f"{leaf}.{weight}"
            for weight, param in module.named_parameters(recurse=False)
            if len(logical_shape(param)) == 3
        }
    return sorted(names)


def linear_modules(model: nn.Module, within: str | None = None) -> set[str]:
    """Full names of the linear layers (inside modules whose class name ends with `within`, e.g.
    Attention), the output head left out."""
    head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    containers = (
        [("", model)]
        if within is None
        else [
            (name, module) for name, module in model.named_modules() if type(module).__name__.endswith(within)
        ]
    )
    return {
        name
        for prefix, container in containers
        for name, module in container.named_modules(prefix=prefix)
        if isinstance(module, nn.Linear) and module is not head
    }


def compact_names(model: nn.Module, selected: set[str]) -> list[str]:
    """peft target names for exactly the modules `selected`: a module's last name (q_proj) where
    every module of that name is selected, its full name otherwise (Gemma-4's router is `proj`)."""
    by_leaf: dict[str, set[str]] = {}
    for name, _ in model.named_modules():
        by_leaf.setdefault(name.rpartition(".")[2], set()).add(name)
    names = set()
    for name in selected:
        leaf = name.rpartition(".")[2]
        names.add(leaf if by_leaf[leaf] <= selected else name)
    return sorted(names)


@dataclass(frozen=True)
class LoraTargets:
    """What peft adapts: modules (a list, or peft's "all-linear") and fused expert parameters."""

    modules: list[str] | str
    parameters: list[str]


def resolve_targets(model: nn.Module, entries: list[str], layout: ExpertsLayout) -> LoraTargets:
    """lora.target_modules read for `model`: presets expanded, other entries passed to peft as names.

    On a MoE model `all-linear` is spelled out as the linear layers' names (the routers left out)
    plus the experts: peft reads its "all-linear" string on MoE models from before transformers 5
    as their per-expert linear layers, and would put LoRA on the router.
    """
    words = [word for entry in entries for word in entry.split("+")]
    everything = any(word in ALL for word in words)
    if EXPERTS in words and not layout.any:
        raise ConfigError(
            f"lora.target_modules: {layout.model_class} has no fused experts to target. "
            "Fix: drop `experts` (e.g. lora.target_modules=[attention])"
        )
    parameters = expert_parameters(layout) if everything or EXPERTS in words else []
    if everything and not layout.any:
        return LoraTargets("all-linear", [])
    if everything:
        return LoraTargets(
            compact_names(model, linear_modules(model) - set(router_names(layout, model))), parameters
        )
    names = {word for word in words if word not in PRESETS}
    if ATTENTION in words:
        attention = linear_modules(model, within="Attention")
        if not attention:
            raise ConfigError(
                f"lora.target_modules: found no linear layers in the attention modules of "
                f"{layout.model_class}. Fix: name the modules, e.g. lora.target_modules=[q_proj,v_proj]"
            )
        names |= set(compact_names(model, attention))
    return LoraTargets(sorted(names), parameters)


def check_peft_rewrite(config: peft.LoraConfig, model: nn.Module, model_class: str) -> None:
    """Refuse targets that peft would rewrite on this model before adapting it.

    For MoE models whose experts were per-expert linear layers before transformers 5 (Qwen2/3-MoE,
    Mixtral, DeepSeek, OLMoE, ...), peft renames targets called gate/gate_proj/up_proj/down_proj
    (w1/w2/w3) to the fused experts and the router, doubling the rank of gate_up_proj: a dense MLP
    or shared expert with those names would silently not be adapted, and the router would be.
    """
    predicted = copy.deepcopy(config)
    convert_peft_config_for_transformers(predicted, model=model, conversions=None)
    if set(predicted.target_modules or ()) == set(config.target_modules or ()):
        return
    renamed = sorted(set(config.target_modules or ()) - set(predicted.target_modules or ()))
    raise ConfigError(
        f"lora.target_modules: on {model_class} peft reads the module names {renamed} as the experts "
        "and router of the model's pre-transformers-5 layout and would target those instead, so these "
        "layers cannot be adapted by name. Fix: lora.target_modules=[attention+experts], or name other "
        "modules"
    )


def target_lora(config: peft.LoraConfig, model: nn.Module, entries: list[str]) -> None:
    """Point `config` (built from the schema) at `model`'s modules and fused experts, in place."""
    layout = find_fused_experts(model)
    targets = resolve_targets(model, entries, layout)
    config.target_modules = targets.modules
    config.target_parameters = targets.parameters or None
    if layout.any and not isinstance(targets.modules, str):
        check_peft_rewrite(config, model, layout.model_class)
    if not targets.parameters:
        return
    config._register_custom_module({GroupedExperts: ExpertsLora})
    if config.lora_dropout and layout.unsupported:
        raise ConfigError(
            f"lora.dropout={config.lora_dropout}: the experts of {layout.model_class} keep their own "
            "layout (model.quantize_experts=false), where peft's ParamWrapper adapts them, and it "
            "cannot apply dropout. Fix: lora.dropout=0, or lora.target_modules=[attention] to leave "
            "the experts without LoRA"
        )
    if config.lora_dropout:
        log.info("LoRA dropout %s applies to the expert LoRA inputs too (factored form)", config.lora_dropout)


def count_trainable_by_kind(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per kind: experts (LoRA on fused experts), attention, other."""
    experts = [n for n, m in model.named_modules() if isinstance(m, ParamWrapper)]
    attention = [n for n, m in model.named_modules() if type(m).__name__.endswith("Attention")]
    counts = {"attention": 0, "experts": 0, "other": 0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(name.startswith(prefix + ".") for prefix in experts):
            counts["experts"] += param.numel()
        elif any(name.startswith(prefix + ".") for prefix in attention):
            counts["attention"] += param.numel()
        else:
            counts["other"] += param.numel()
    return counts


def load_adapter(base: nn.Module, adapter_dir: Path, is_trainable: bool = False) -> peft.PeftModel:
    """A saved adapter on `base`: grouped experts get ExpertsLora, experts in other layouts peft's own
    ParamWrapper (a 16-bit model for qlora-merge, model.quantize_experts=false)."""
    config = peft.LoraConfig.from_pretrained(str(adapter_dir))
    if config.target_parameters:
        config._register_custom_module({GroupedExperts: ExpertsLora})
        if not is_trainable:
            config.lora_dropout = 0.0  # training-only, and peft's ParamWrapper refuses it
    return peft.PeftModel.from_pretrained(base, str(adapter_dir), config=config, is_trainable=is_trainable)
