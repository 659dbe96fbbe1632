"""Precision of what is not 4-bit: the compute dtype, the Trainer's mixed precision, the dtype of
embeddings and norms, and the fp32 residual stream (hooks neither peft nor transformers offers)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from qlora_exp.errors import ConfigError

DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "uint8": torch.uint8,
}


def auto_is_bf16() -> bool:
    """What `auto` means for both the compute dtype and the Trainer's precision: bf16 on a GPU that
    supports it, fp32 elsewhere (CPU bf16 matmuls are slow)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_compute_dtype(name: str) -> torch.dtype:
    """`auto` is bf16 on a GPU that supports it, fp32 elsewhere (CPU bf16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if auto_is_bf16() else torch.float32
    return DTYPES[name]


def resolve_precision(name: str) -> str:
    """The Trainer's mixed precision: `auto` is bf16 or fp32 as `auto_is_bf16` says."""
    if name != "auto":
        return name
    return "bf16" if auto_is_bf16() else "fp32"


def cast_unquantized_params(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating-point parameter that is not 4-bit (embeddings, norms, adapters) to `dtype`."""
    for param in model.parameters():
        if param.is_floating_point() and param.__class__.__name__ != "Params4bit" and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _to_float32(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def _submodule(root: Any, path: str) -> torch.nn.Module:
    """`root.a.b` for path "a.b"; a ConfigError naming what `model.fp32_residual` misses otherwise."""
    module = root
    for name in path.split("."):
        module = getattr(module, name, None)
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(
            f"model.fp32_residual: {type(root).__name__} has no `{path}` module, which this switch "
            "hooks (it knows Llama-style decoders: layers[i].input_layernorm, .self_attn.o_proj, "
            ".mlp.down_proj). Fix: model.fp32_residual=false, or "
            "model.upcast_unquantized_params=true for fp32 activations throughout"
        )
    return module


def keep_fp32_residual(model: PreTrainedModel, compute_dtype: torch.dtype) -> list[RemovableHandle]:
    """Hooks that keep the residual stream in fp32 and everything else in `compute_dtype`; returns them.

    Written here because neither peft nor transformers offers it. peft's k-bit preparation gets an
    fp32 residual only by upcasting the embedding matrix, which makes every activation fp32: the
    tied LM head becomes an fp32 matmul, flex attention and the MLP run in fp32, and every 4-bit
    matmul casts its input down and its output back up. Under bf16 autocast that buys nothing
    inside a block: the matmuls round their inputs to bf16 anyway. What fp32 does keep is LoRA's
    small early updates (B starts at zero, so its first contributions sit far below bf16's
    resolution): they survive where a LoRA output is added to an fp32 base output and that sum
    goes into the fp32 residual. So:
      - the embedding output is cast to fp32 (the residual stream);
      - each block's attention input (`input_layernorm`'s output) and MLP input, the rotary cos/sin
        and the final norm's output (the LM head's input) go to `compute_dtype`;
      - the projections that write into the residual (`self_attn.o_proj`, `mlp.down_proj`) return
        fp32, so peft adds their LoRA outputs in fp32 and the norms after them see fp32.
    """
    decoder = model.get_decoder()
    layers = list(_submodule(decoder, "layers").children())
    to_compute = [_submodule(decoder, "norm"), _submodule(decoder, "rotary_emb")]
    to_compute += [_submodule(layer, "input_layernorm") for layer in layers]
    mlps = [_submodule(layer, "mlp") for layer in layers]
    writers = [_submodule(layer, "self_attn.o_proj") for layer in layers]
    writers += [_submodule(layer, "mlp.down_proj") for layer in layers]

    def to_compute_dtype(module: torch.nn.Module, inputs: tuple, output: Any) -> Any:
        if isinstance(output, tuple):  # rotary embeddings: (cos, sin)
            return tuple(t.to(compute_dtype) for t in output)
        return output.to(compute_dtype)

    def input_to_compute_dtype(module: torch.nn.Module, args: tuple) -> tuple:
        return tuple(a.to(compute_dtype) if torch.is_tensor(a) else a for a in args)

    handles = [model.get_input_embeddings().register_forward_hook(_to_float32)]
    handles += [m.register_forward_hook(to_compute_dtype) for m in to_compute]
    handles += [m.register_forward_pre_hook(input_to_compute_dtype) for m in mlps]
    # On the 4-bit module itself (peft's `base_layer` once LoRA wraps it), so that the LoRA output
    # is added to an fp32 result.
    handles += [getattr(m, "base_layer", m).register_forward_hook(_to_float32) for m in writers]
    return handles


def set_unquantized_precision(
    model: PreTrainedModel, *, upcast: bool, fp32_residual: bool, compute_dtype: torch.dtype
) -> list[RemovableHandle]:
    """Embeddings and norms in fp32 (`upcast`) or the compute dtype, optionally with an fp32 residual.

    Returns the handles of the hooks it added, so that a caller reusing the model can remove them.
    """
    cast_unquantized_params(model, torch.float32 if upcast else compute_dtype)
    if upcast or not fp32_residual or compute_dtype == torch.float32:
        return []  # the residual stream already has the dtype of the embeddings
    return keep_fp32_residual(model, compute_dtype)
