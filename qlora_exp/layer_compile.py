"""`model.compile_layers`: torch.compile over each decoder layer while it trains (regional compilation).

Why by hand: transformers' `torch_compile` argument compiles the whole model, once per process, in
every mode (evaluation and generation included, where a growing KV cache recompiles), and peft's and
bitsandbytes' docs cover compiling a model for inference, not a 4-bit model under LoRA training. The
profile of a Gemma-2-9B step (benchmarks/h200_gemma2_9b_profile_defaults.txt) has ~45% of the GPU's
time outside the matmuls: casts, residual adds, norms, LoRA's dropout and scaling, each its own kernel
and its own launch. Compiling the layer lets Inductor fuse them.

- One compile serves every layer: the layers share their code, and torch's default
  `inline_inbuilt_nn_modules` makes their parameters graph inputs instead of constants
  (pytorch.org's regional-compilation recipe). Layers that differ in a constant (Gemma-2's
  sliding and global attention) compile once each.
- Only in training mode with gradients: evaluation and generation (a KV cache that grows each
  token) run the layers as they are, uncompiled.
- Gradient checkpointing stays eager, around the compiled forward (`_compiled_training_forward`).
- Liger's kernels stay outside the compiled layers (`model.apply_liger`): its RMSNorm, RoPE and
  GeGLU autograd functions are not compile-safe (kernels-community#906 disables them under compile
  for deviating), and Inductor fuses those ops with their neighbours itself. The fused LM head and
  loss, outside the layers, stay Liger's.
- CUDA only (bitsandbytes' 4-bit ops compile there, torch >= 2.8): without CUDA the layers run as
  they are, with a warning, like every other speed switch.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
from peft import PeftModel
from transformers.modeling_layers import GradientCheckpointingLayer

from qlora_exp.errors import ConfigError

log = logging.getLogger(__name__)

# torch's default allows 8 compiles per code object; the layer's variants (sliding/global attention,
# the first static shape then dynamic shapes, forward with and without gradients) can exceed it,
# and past it torch silently runs the layer uncompiled.
RECOMPILE_LIMIT = 32
_EAGER_FORWARD = "_qlora_eager_forward"
# Whether this process has compiled some model's layers before (a sweep's earlier job, a bench setting).
_PROCESS = {"compiled_before": False}


def decoder_layers(
    model: torch.nn.Module, key: str = "model.compile_layers", off: str = "false"
) -> list[torch.nn.Module]:
    """The repeated decoder layers of a causal LM (inside peft's wrapper too), or a ConfigError naming
    the setting `key` that needs them and its value `off` that does without."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    get_decoder = getattr(base, "get_decoder", None)
    layers = getattr(get_decoder() if callable(get_decoder) else None, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ConfigError(
            f"{key}: {type(base).__name__} has no decoder `layers` list. "
            f"Fix: {key}={off} for this architecture"
        )
    return list(layers)


def _compiled_training_forward(layer: torch.nn.Module, backend: str) -> Any:
    """The layer's forward, compiled while it trains, with its gradient checkpointing kept outside the
    compiled code.

    transformers checkpoints inside `forward` (GradientCheckpointingLayer wraps the class's own
    forward, kept as `__wrapped__`; one level only: the forward's own decorators, such as
    deprecate_kwarg's renaming, stay). Compiling that wrapper would trace the checkpoint
    into the graph, and torch 2.11's partitioner then saves the layer's activations instead of
    recomputing them (measured on Gemma-2-9B: 78.7 GiB against 20.7) and fails on dropout inside
    the checkpoint. So the layer's own forward is compiled, and the checkpoint is taken around it
    with transformers' own checkpoint function, as its wrapper does: the saved activations and the
    dropout masks are those of eager checkpointing.
    """
    eager = layer.forward
    checkpointed = isinstance(layer, GradientCheckpointingLayer)
    class_forward: Any = type(layer).forward
    own_forward = class_forward.__wrapped__ if checkpointed else class_forward
    compiled = torch.compile(own_forward, backend=backend)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not (layer.training and torch.is_grad_enabled()):
            return eager(*args, **kwargs)
        if checkpointed and layer.gradient_checkpointing:
            if kwargs.get("use_cache"):  # as transformers' wrapper: no cache under checkpointing
                kwargs["use_cache"] = False
            checkpoint: Any = layer._gradient_checkpointing_func  # transformers' own, as it calls it
            return checkpoint(partial(compiled, layer, **kwargs), *args)
        return compiled(layer, *args, **kwargs)

    return forward


def set_uncheckpointed_layers(model: torch.nn.Module, count: int) -> None:
    """Checkpoint every decoder layer but the last `count` (model.uncheckpointed_layers), which keep
    their activations for the backward instead of recomputing them: each saves one layer's forward
    per step and holds one layer's activations. The last ones, because the backward starts there and
    frees them before it recomputes any other layer.

    By hand: transformers' own selection (`every_n_layers`) checkpoints every n-th layer, which frees
    half the layers' activations or more at once (~1.2 GiB each for a Gemma-2-9B step); this keeps
    just as many as the memory allows."""
    layers = decoder_layers(model, "model.uncheckpointed_layers", "0")
    checkpointing = any(getattr(layer, "gradient_checkpointing", False) for layer in layers)
    if count and not checkpointing:
        raise ConfigError(
            f"model.uncheckpointed_layers={count}: gradient checkpointing is off, so every layer keeps "
            "its activations already. Fix: model.uncheckpointed_layers=0, or "
            "model.gradient_checkpointing=true"
        )
    if count >= len(layers):
        raise ConfigError(
            f"model.uncheckpointed_layers={count}: the model has {len(layers)} decoder layers, so none "
            f"would be checkpointed. Fix: at most {len(layers) - 1}, or model.gradient_checkpointing=false"
        )
    if checkpointing:
        for index, layer in enumerate(layers):
            # transformers' own flag, read by each layer as it runs (GradientCheckpointingLayer)
            setattr(layer, "gradient_checkpointing", index < len(layers) - count)  # noqa: B010
    if count:
        log.info(
            "model.uncheckpointed_layers: the last %d of %d decoder layers keep their activations",
            count,
            len(layers),
        )


def layers_compile(requested: bool) -> bool:
    """`requested`, or False with a warning where the layers cannot compile (no CUDA; see the module's
    docstring): every path that compiles layers or reports whether they were goes through here."""
    if requested and not torch.cuda.is_available():
        log.warning("model.compile_layers: no CUDA GPU, so the decoder layers run uncompiled")
        return False
    return requested


def compile_decoder_layers(model: torch.nn.Module, backend: str = "inductor") -> int:
    """Compile each decoder layer's training forward (see the module's docstring); returns how many.

    Without CUDA nothing is compiled and a warning says so. Compilation itself happens at the first
    training step; `uncompile_decoder_layers` undoes this. `backend` is torch.compile's.
    """
    layers = decoder_layers(model)
    if not layers_compile(True):
        return 0
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    if _PROCESS["compiled_before"] and not any(hasattr(layer, _EAGER_FORWARD) for layer in layers):
        # A later model in this process (a sweep's next job, another bench setting): its layers would
        # fail the earlier compile's guards (another LoRA rank, peft's scaling constant) and recompile
        # with dynamic shapes, which took 80 s for a Gemma-2-9B sweep's second job on an H200 against
        # 24 s for the same job's static compile in a new process (BENCHMARKS.md). Dropping the
        # in-memory compiles makes it compile as a new process does, from the on-disk caches.
        torch._dynamo.reset()
        log.info("model.compile_layers: earlier compiles of this process dropped; compiling afresh")
    _PROCESS["compiled_before"] = True
    for layer in layers:
        if hasattr(layer, _EAGER_FORWARD):
            continue  # already compiled
        # What `forward` was on the instance before (None: the class's), for uncompile_decoder_layers.
        setattr(layer, _EAGER_FORWARD, vars(layer).get("forward"))
        layer.forward = _compiled_training_forward(layer, backend)
    log.info("model.compile_layers: %d decoder layers compile at the first training step", len(layers))
    return len(layers)


def uncompile_decoder_layers(model: torch.nn.Module) -> None:
    """Each layer's forward as it was before compile_decoder_layers (the bench reuses one base across
    settings); a no-op if none is compiled."""
    for layer in model.modules():
        if hasattr(layer, _EAGER_FORWARD):
            before = getattr(layer, _EAGER_FORWARD)
            delattr(layer, _EAGER_FORWARD)
            if before is None:
                del layer.forward  # the instance attribute; the class's forward shows through again
            else:
                layer.forward = before
