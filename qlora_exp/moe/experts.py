"""Fused MoE experts with frozen weights in 4 bits (or left unquantized), computed per expert group.

transformers 5 stores a layer's experts as fused 3-D parameters (`gate_up_proj` of shape
(experts, 2 x moe_intermediate, hidden), `down_proj`) behind one interface: an experts module
decorated with `use_experts_implementation` says how its weights are laid out (`has_gate`,
`is_transposed`, `has_bias`, `has_post_expert_norm`) and gates with `_apply_gate`. bitsandbytes
quantizes only `nn.Linear`, so those weights would load in 16 bits. Here each such module keeps
its class and attributes and gains `GroupedExperts.forward` (its class is swapped for a subclass,
as bitsandbytes' Linear4bit subclasses nn.Linear): each weight is one `bnb.nn.Params4bit` holding
every expert of the layer (NF4 and double quantization as configured; one expert fills whole
blocks of 64 in real models, so one expert's blocks can be dequantized alone), dequantized on the
fly in the forward and again in the backward, never kept.

The computation is transformers' `grouped_mm` experts implementation (token-expert pairs sorted by
expert, one grouped matmul per projection) with three differences: the frozen weights are
dequantized inside an autograd function that returns gradients to the inputs only (QLoRA's
trade: memory for a second dequantization); a decode step with fewer pairs than experts
dequantizes only the experts its pairs use; and LoRA on the experts (qlora_exp/moe/lora.py) is
added in factored form, x A_e^T B_e^T, so dropout applies to its input as on any LoRA layer.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeGuard

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import _batched_linear

# torch >= 2.10 names it grouped_mm; 2.9 has the same kernel as torch._grouped_mm.
_NATIVE_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# The native kernel's operand strides must be multiples of 16 bytes.
_GROUPED_MM_ALIGNMENT = 16


def expert_weight_names(module: nn.Module) -> tuple[str, str]:
    """The up (or gate+up) and down weight of a transformers experts module."""
    return ("gate_up_proj" if getattr(module, "has_gate", True) else "up_proj", "down_proj")


def implements_experts_interface(module: nn.Module) -> bool:
    """True for an experts module built with transformers' `use_experts_implementation` (the fused
    layout the forward below computes), whose two weights are 3-D."""
    if not all(hasattr(module, flag) for flag in ("has_gate", "is_transposed", "has_bias")):
        return False
    return all(
        len(logical_shape(getattr(module, name, torch.empty(0)))) == 3 for name in expert_weight_names(module)
    )


def logical_shape(weight: torch.Tensor) -> torch.Size:
    """A weight's shape before 4-bit packing (a packed Params4bit is stored flat)."""
    quant_state = getattr(weight, "quant_state", None)
    return torch.Size(quant_state.shape) if quant_state is not None else weight.shape


def is_quantized(weight: torch.Tensor) -> TypeGuard[bnb.nn.Params4bit]:
    """True for a 4-bit (packed) weight."""
    return isinstance(weight, bnb.nn.Params4bit)


def _absmax(state: bnbf.QuantState) -> torch.Tensor:
    """Per-block scales in fp32, the double-quantized ones dequantized first."""
    if state.nested:
        return bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax.float()


def dequantize_experts(
    weight: torch.Tensor, experts: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Experts `experts` (all when None) of a fused weight as a (n, a, b) tensor in `dtype`.

    A 4-bit weight is dequantized: only the chosen experts' blocks when each expert fills whole
    blocks (real models do), otherwise all of them first. An unquantized weight is indexed.
    """
    if not is_quantized(weight):
        return (weight if experts is None else weight[experts]).to(dtype)
    state = weight.quant_state
    shape = torch.Size(state.shape)
    if experts is not None and math.prod(shape[1:]) % state.blocksize:
        return dequantize_experts(weight, None, dtype)[experts]
    packed = weight.data.view(torch.uint8).reshape(-1)  # FSDP stores the bytes as bf16
    absmax = _absmax(state)
    if experts is not None:
        packed = packed.view(shape[0], -1)[experts].reshape(-1)
        absmax = absmax.view(shape[0], -1)[experts].reshape(-1)
        shape = torch.Size((experts.numel(), *shape[1:]))
    selected = bnbf.QuantState(
        absmax=absmax,
        shape=shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=dtype,
    )
    return bnbf.dequantize_4bit(packed.unsqueeze(1), selected)


def _grouped_mm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped matmul kernel takes these operands (dtype, device and alignment)."""
    if _NATIVE_GROUPED_MM is None or x.dtype != weight.dtype:
        return False
    if x.device.type == "cuda" and (
        x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0)
    ):
        return False  # the CUDA kernel is bf16-only, sm80+
    elements = _GROUPED_MM_ALIGNMENT // x.element_size()
    return all(size % elements == 0 for size in (x.shape[-1], weight.shape[-2], weight.shape[-1]))


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x (rows sorted by group) @ weight[group] (groups, k, n), group g ending at row offsets[g].

    torch's kernel where it applies; otherwise one matmul per group (one host sync for the
    offsets), for the dtypes, devices and odd sizes (a LoRA rank of 2 in fp32) it does not take.
    """
    if _grouped_mm_fits(x, weight):
        assert _NATIVE_GROUPED_MM is not None
        return _NATIVE_GROUPED_MM(x, weight, offs=offsets)
    bounds = itertools.pairwise([0, *offsets.tolist()])
    return torch.cat([x[start:end] @ weight[group] for group, (start, end) in enumerate(bounds)])


@dataclass(frozen=True)
class Routes:
    """Where each token-expert pair goes.

    Grouped (training, prefill: at least as many pairs as experts): pairs sorted by expert, with
    `offsets` ending each expert's rows and `restore` putting them back in token order. Per pair
    (decode): pairs in token order, each computed with its own expert's weights.
    """

    experts: torch.Tensor  # (pairs,) expert of each pair, in computation order
    tokens: torch.Tensor  # (pairs,) token of each pair
    weights: torch.Tensor  # (pairs,) routing weight of each pair
    offsets: torch.Tensor | None  # grouped: (experts,) cumulative row counts (int32)
    restore: torch.Tensor | None  # grouped: computation order -> token order

    @classmethod
    def plan(cls, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> Routes:
        """Grouped when there are at least as many pairs as experts, per pair otherwise."""
        experts = top_k_index.reshape(-1)
        weights = top_k_weights.reshape(-1)
        top_k = top_k_index.shape[-1]
        if experts.numel() < num_experts:
            tokens = torch.arange(experts.numel(), device=experts.device) // top_k
            return cls(experts, tokens, weights, None, None)
        sorted_experts, order = torch.sort(experts, stable=True)
        counts = torch.bincount(sorted_experts, minlength=num_experts)
        restore = torch.empty_like(order)
        restore[order] = torch.arange(order.numel(), device=order.device)
        return cls(
            sorted_experts,
            order // top_k,
            weights[order],
            torch.cumsum(counts, dim=0, dtype=torch.int32),
            restore,
        )

    @property
    def grouped(self) -> bool:
        """True when pairs are sorted into expert groups."""
        return self.offsets is not None

    def linear(self, x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
        """x @ W_e^T for each pair's expert e; W is (experts, out, in), or (experts, in, out) when
        `transposed`; per pair, `weight` already holds each pair's expert."""
        if self.offsets is not None:
            return grouped_mm(x, weight if transposed else weight.transpose(-2, -1), self.offsets)
        return _batched_linear(x, weight, is_transposed=transposed)


class _FrozenExpertsLinear(torch.autograd.Function):
    """x @ W_e^T with W dequantized in the forward and again in the backward, never saved.

    The weights are frozen, so the backward needs only the input gradient, dY @ W_e: the same
    product with the layout flipped. Saving the dequantized weights for it would keep every layer's
    16-bit experts alive until its backward; bitsandbytes' own 4-bit matmul makes the same trade.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, routes: Routes, transposed: bool
    ) -> torch.Tensor:
        ctx.weight, ctx.routes, ctx.transposed = weight, routes, transposed
        return routes.linear(x, _weights_for(weight, routes, x.dtype), transposed)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        routes: Routes = ctx.routes
        weight = _weights_for(ctx.weight, routes, grad.dtype)
        return routes.linear(grad.contiguous(), weight, not ctx.transposed), None, None, None


def _weights_for(weight: torch.Tensor, routes: Routes, dtype: torch.dtype) -> torch.Tensor:
    """Every expert of the layer when grouped; each pair's expert otherwise."""
    return dequantize_experts(weight, None if routes.grouped else routes.experts, dtype)


@dataclass(frozen=True)
class ExpertLoraFactors:
    """One adapter's LoRA on one fused expert weight, in peft's ParamWrapper layout:
    `a` is (experts x r, in), `b` is (out, r x experts)."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    dropout: nn.Module
    num_experts: int

    def __call__(self, x: torch.Tensor, routes: Routes) -> torch.Tensor:
        """scaling * (dropout(x) @ A_e^T) @ B_e^T for each pair's expert e."""
        a = self.a.view(self.num_experts, -1, self.a.shape[-1]).to(x.dtype)  # (E, r, in)
        b = self.b.view(self.b.shape[0], -1, self.num_experts).permute(2, 0, 1).to(x.dtype)  # (E, out, r)
        if routes.offsets is not None:
            # grouped_mm needs one of the two last dimensions contiguous: (E, out, r) is made so.
            hidden = grouped_mm(self.dropout(x), a.transpose(-2, -1), routes.offsets)
            return grouped_mm(hidden, b.contiguous().transpose(-2, -1), routes.offsets) * self.scaling
        hidden = _batched_linear(self.dropout(x), a[routes.experts])
        return _batched_linear(hidden, b[routes.experts]) * self.scaling


class GroupedExperts(nn.Module):
    """Forward of a transformers experts module with frozen fused weights (4-bit or not).

    Not instantiated itself: `to_grouped_experts` turns an experts module of a model into one by
    giving it a subclass of (GroupedExperts, its own class), so every attribute it had stays.
    """

    # The experts module's own (transformers' experts interface).
    num_experts: int
    has_gate: bool
    has_bias: bool
    is_transposed: bool
    has_post_expert_norm: bool
    _is_expert_parallel: bool
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    _apply_gate: Callable[[torch.Tensor], torch.Tensor]
    post_expert_norm: Callable[[torch.Tensor], torch.Tensor]
    # Set by to_grouped_experts.
    compute_dtype: torch.dtype | None
    expert_lora: dict[str, tuple[ExpertLoraFactors, ...]]
    source_cls: type[nn.Module]

    @contextmanager
    def lora_applied(self, weight_name: str, factors: tuple[ExpertLoraFactors, ...]) -> Iterator[None]:
        """Add `factors` to the projection through `weight_name` in the forward calls inside."""
        self.expert_lora[weight_name] = factors
        try:
            yield
        finally:
            del self.expert_lora[weight_name]

    def _project(self, name: str, x: torch.Tensor, routes: Routes) -> torch.Tensor:
        weight = getattr(self, name)
        y = _FrozenExpertsLinear.apply(x, weight, routes, self.is_transposed)
        if self.has_bias:
            y = y + getattr(self, f"{name}_bias")[routes.experts].to(y.dtype)
        for factors in self.expert_lora.get(name, ()):
            y = y + factors(x, routes)
        return y

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """The experts' weighted sum for each token (the same contract as transformers' forward)."""
        if self._is_expert_parallel:
            raise NotImplementedError("expert parallelism is not supported with qlora-exp's fused experts")
        up_name, down_name = expert_weight_names(self)
        routes = Routes.plan(top_k_index, top_k_weights, self.num_experts)
        x = hidden_states[routes.tokens].to(self.compute_dtype or hidden_states.dtype)
        h = self._project(up_name, x, routes)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        out = self._project(down_name, h, routes)
        if self.has_post_expert_norm:
            out = self.post_expert_norm(out)
        out = out * routes.weights.unsqueeze(-1).to(out.dtype)
        if routes.restore is not None:
            out = out[routes.restore]
        # Summing each token's top-k rows in order is deterministic, unlike index_add_ on CUDA.
        per_token = out.view(hidden_states.shape[0], top_k_index.shape[-1], -1).sum(dim=1)
        return per_token.to(hidden_states.dtype)


def liger_kernel_config(model: nn.Module) -> dict[str, Any] | None:
    """Keyword arguments for Liger's patching of `model` (transformers' `apply_liger_kernel`).

    On transformers 5, Liger's SwiGLU patch binds its own fused-MoE forward (LigerExperts) onto the
    experts modules, which would read the 4-bit weights as 16-bit ones and bypass the forward here:
    it is switched off where the model has grouped experts; the other kernels apply as usual.
    """
    return {"swiglu": False} if any(isinstance(m, GroupedExperts) for m in model.modules()) else None


_GROUPED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def grouped_experts_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The subclass of `cls` whose forward is GroupedExperts' (one per class)."""
    if cls not in _GROUPED_CLASSES:
        _GROUPED_CLASSES[cls] = type(
            f"Grouped{cls.__name__}", (GroupedExperts, cls), {"__module__": __name__}
        )
    return _GROUPED_CLASSES[cls]


def to_grouped_experts(module: nn.Module, compute_dtype: torch.dtype | None) -> None:
    """Give a transformers experts module GroupedExperts' forward, in place (meta or loaded)."""
    source_cls = type(module)
    module.__class__ = grouped_experts_class(source_cls)
    assert isinstance(module, GroupedExperts)
    module.source_cls = source_cls  # transformers' bnb loader reads it, as on Linear4bit
    module.compute_dtype = compute_dtype
    module.expert_lora = {}


def quantize_placeholders(module: GroupedExperts, quantization_config: Any) -> None:
    """Replace the (meta) fused weights by 4-bit placeholders; transformers' bitsandbytes loader then
    quantizes each as it loads, as it does Linear4bit weights."""
    for name in expert_weight_names(module):
        old = getattr(module, name)
        placeholder = bnb.nn.Params4bit(
            torch.empty(old.shape, dtype=old.dtype, device=old.device),
            requires_grad=False,
            compress_statistics=quantization_config.bnb_4bit_use_double_quant,
            quant_type=quantization_config.bnb_4bit_quant_type,
            quant_storage=quantization_config.bnb_4bit_quant_storage,
        )
        setattr(module, name, placeholder)
