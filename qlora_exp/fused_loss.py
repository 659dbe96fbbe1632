"""The LM head fused with the loss for the multimodal Gemma classes trained on text.

Gemma-3 4B/12B/27B and Gemma-4 load as `Gemma3ForConditionalGeneration` / `Gemma4ForConditionalGeneration`
(qlora_exp/multimodal.py). Liger fuses a causal LM's head with its cross-entropy, so that the
vocabulary-sized logits (262,144 per token here, in fp32 for the loss) are never materialised, by
replacing the model's whole forward with its own copy of transformers'. For these classes that copy
does not fit transformers 5.24: liger-kernel 0.8.5's Gemma-3 `multimodal_forward` ends by reading
`outputs.image_hidden_states`, a property that fails when the batch has no image (every text-only
batch; seen on an H200), and its Gemma-4 one is a second copy of a forward that transformers keeps
changing. So Liger patches only the kernels inside the language model (RMSNorm, GeGLU, RoPE; its fused
loss off: `liger_kernel_config`), and `fuse_head_and_loss` gives the model a forward that leaves the
body to the class: for a training batch with labels it calls the class's inner model exactly as the
class's own forward does (the same arguments, labels included), then hands the final hidden states,
the head's weight, the labels and the text config's final-logit soft-cap to a loss function that
computes what `lm_head`, the soft-cap and `self.loss_function` would. Anything else (evaluation,
generation, positional inputs, `logits_to_keep`, `return_dict=False`) goes to the class's forward.

The loss function is an argument: Liger's `LigerForCausalLMLoss` on a GPU; the tests pass a plain
PyTorch one and compare with the class's own forward on the CPU, where Triton cannot run.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

log = logging.getLogger(__name__)

# Model types whose class forward this module reproduces around the head: `self.model(...)`, then
# `lm_head`, the text config's final-logit soft-cap (Gemma-4's 30; none for Gemma-3) and
# `self.loss_function` (transformers 5.24's Gemma3/Gemma4ForConditionalGeneration.forward).
FUSED_LOSS_MODEL_TYPES = frozenset({"gemma3", "gemma4"})

# (hidden_states, lm_head_weight, labels, hidden_size, final_logit_softcapping, **loss kwargs) -> loss:
# LigerForCausalLMLoss's signature.
LossFunction = Callable[..., torch.Tensor]


def uses_fused_loss_forward(model: PreTrainedModel) -> bool:
    """True for a model whose Liger patch leaves the head and loss to `fuse_head_and_loss`."""
    return model.config.model_type in FUSED_LOSS_MODEL_TYPES


def liger_causal_lm_loss() -> LossFunction:
    """Liger's fused linear cross-entropy for causal LMs (labels shifted, soft-cap, mean or sum)."""
    # Imported here: liger-kernel is the optional `gpu` extra (Triton), absent on CPU machines.
    from liger_kernel.transformers.model.loss_utils import LigerForCausalLMLoss  # noqa: PLC0415

    return LigerForCausalLMLoss


def _fusable(model: PreTrainedModel, args: tuple, kwargs: dict[str, Any]) -> bool:
    """A training batch with labels whose full logits nobody asked for."""
    logits_to_keep = kwargs.get("logits_to_keep", 0)
    return (
        model.training
        and not args
        and kwargs.get("labels") is not None
        and isinstance(logits_to_keep, int)
        and logits_to_keep == 0
        and kwargs.get("return_dict") is not False
    )


def fuse_head_and_loss(model: PreTrainedModel, loss_function: LossFunction) -> None:
    """Give `model` (one of FUSED_LOSS_MODEL_TYPES) the forward the module docstring describes, in place."""
    if not uses_fused_loss_forward(model):
        raise TypeError(
            f"fuse_head_and_loss reproduces {sorted(FUSED_LOSS_MODEL_TYPES)}, not {model.config.model_type}"
        )
    # The class's forward, not `model.forward`: calling this again (the bench patches each Liger
    # setting) replaces the fused forward instead of wrapping it.
    class_forward = type(model).forward.__get__(model)
    # The class's own forward passes its **kwargs (num_items_in_batch, ...) to both the inner model and
    # the loss; its named parameters are model inputs only.
    inputs = {
        name
        for name, parameter in inspect.signature(class_forward).parameters.items()
        if parameter.kind is not inspect.Parameter.VAR_KEYWORD
    }
    text_config = model.config.get_text_config(decoder=True)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not _fusable(model, args, kwargs):
            return class_forward(*args, **kwargs)
        kwargs.pop("logits_to_keep", None)
        kwargs.pop("return_dict", None)
        outputs = model.base_model(**kwargs, return_dict=True)
        loss = loss_function(
            hidden_states=outputs.last_hidden_state,
            lm_head_weight=model.get_output_embeddings().weight,
            hidden_size=text_config.hidden_size,
            final_logit_softcapping=getattr(text_config, "final_logit_softcapping", None),
            **{key: value for key, value in kwargs.items() if key not in inputs or key == "labels"},
        )
        return CausalLMOutputWithPast(
            loss=loss, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    model.forward = forward
    log.info("%s: LM head fused with the loss for training batches", type(model).__name__)
