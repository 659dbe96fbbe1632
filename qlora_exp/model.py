"""Quantized-model factory: BitsAndBytesConfig -> from_pretrained -> prepare for k-bit -> LoRA."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import bitsandbytes as bnb
import peft
import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations.liger import apply_liger_kernel

from qlora_exp.attention import configure_flex_compile, set_flex_attention, trainable_attention
from qlora_exp.cache import configure_compile_cache
from qlora_exp.embedded import is_embedded, resolve_embedded
from qlora_exp.errors import ConfigError
from qlora_exp.fused_loss import fuse_head_and_loss, liger_causal_lm_loss, uses_fused_loss_forward
from qlora_exp.layer_compile import compile_decoder_layers, set_uncheckpointed_layers
from qlora_exp.moe.experts import liger_kernel_config
from qlora_exp.moe.loading import experts_out_of_upcast, fused_experts_loading
from qlora_exp.moe.lora import count_trainable_by_kind, load_adapter, target_lora
from qlora_exp.multimodal import attention_implementations, exclude_non_text, loading_plan
from qlora_exp.precision import DTYPES, resolve_compute_dtype, set_unquantized_precision
from qlora_exp.run.directory import ADAPTER_DIR, TOKENIZER_DIR
from qlora_exp.schema import LoraConfig, ModelConfig

log = logging.getLogger(__name__)

# Architectures that soft-cap attention logits: SDPA silently drops the cap.
SOFTCAP_MODEL_TYPES = frozenset({"gemma2"})


def resolve_source(cfg: ModelConfig) -> str:
    """Where `from_pretrained` reads from: a hub id, a local dir, or a built embedded checkpoint."""
    return str(resolve_embedded(cfg.name_or_path)) if is_embedded(cfg.name_or_path) else cfg.name_or_path


def build_quantization_config(cfg: ModelConfig, skip_modules: list[str] | None = None) -> BitsAndBytesConfig:
    """4-bit NF4 (or FP4) with optional double quantization, compute dtype from config; `skip_modules`
    stay unquantized (None: transformers' default, the output head)."""
    storage = DTYPES[cfg.bnb_4bit_quant_storage] if cfg.bnb_4bit_quant_storage else torch.uint8
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=resolve_compute_dtype(cfg.bnb_4bit_compute_dtype),
        bnb_4bit_quant_storage=storage,
        llm_int8_skip_modules=skip_modules,
    )


def build_lora_config(cfg: LoraConfig) -> peft.LoraConfig:
    """peft's LoraConfig for a causal LM from our schema."""
    targets: str | list[str] = (
        "all-linear" if list(cfg.target_modules) == ["all-linear"] else list(cfg.target_modules)
    )
    return peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias=cfg.bias,  # type: ignore[arg-type]  # validated by the schema
        use_rslora=cfg.use_rslora,
        modules_to_save=list(cfg.modules_to_save) or None,
        ensure_weight_tying=bool(cfg.modules_to_save),
        task_type=peft.TaskType.CAUSAL_LM,
    )


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer from the same source as the model, with a pad token guaranteed."""
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_source(cfg), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if tokenizer.pad_token is None:
        # Llama-3 and Mistral ship without one; padding positions are masked, so EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_attention(cfg: ModelConfig, source: str) -> str | dict[str, str]:
    """transformers' `attn_implementation` for `source`: `model.attn_implementation` for the language
    model, towers as `multimodal.attention_implementations` says; refuses an implementation that is
    wrong for the architecture, before weights load. Flex attention becomes eager (exact, soft-cap
    kept) where it cannot train: flex attention has no backward on the CPU."""
    config = AutoConfig.from_pretrained(
        source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if config.model_type in SOFTCAP_MODEL_TYPES and cfg.attn_implementation == "sdpa":
        raise ConfigError(
            f"model.attn_implementation: sdpa drops {config.model_type}'s attention-logit soft-capping. "
            "Fix: use eager, flex_attention or flash_attention_2 (>= 2.6)"
        )
    return attention_implementations(config, trainable_attention(cfg.attn_implementation))


# bitsandbytes' Linear4bit switch for its CPU repacking (an internal attribute, set in its __init__
# from `has_avx512bf16()`; bitsandbytes 0.49-0.50).
_CPU_REPACK_SWITCH = "support_avx512bf16_for_cpu"
# Set on a QuantState once bitsandbytes has repacked its weight in place.
_CPU_PACKED_FLAG = "packing_format_for_cpu"


def quantized_linears(model: torch.nn.Module) -> list[bnb.nn.Linear4bit]:
    """Every 4-bit linear layer of `model` (inside peft's LoRA wrappers too)."""
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def disable_cpu_weight_repacking(model: torch.nn.Module) -> int:
    """Keep every 4-bit layer off bitsandbytes' in-place CPU repacking path; returns how many.

    On a CPU with AVX512-BF16, bitsandbytes (0.49+) repacks a Linear4bit's weight in place the first
    time the layer runs in eval mode without gradients (an evaluation, a generation), and from then
    on multiplies through `gemv_4bit`, which has no autograd kernel: no gradient flows through any
    frozen 4-bit matmul, so every LoRA layer below the last projection stops learning. Each
    `state_dict()` unpacks the weight again, lossily, so the base weights drift at every checkpoint.
    The switch is a bitsandbytes internal with no public setter, hence the attribute; a version
    without it has no such path or another trigger, which `check_no_packed_weights` (called during
    training by guards.QuantizedWeightGuard) would catch. CPU generation gets slower; training
    stays right. The packing also fails outright for shapes it cannot tile (Gemma-4).
    """
    layers = quantized_linears(model)
    for layer in layers:
        if hasattr(layer, _CPU_REPACK_SWITCH):
            setattr(layer, _CPU_REPACK_SWITCH, False)
    return len(layers)


def packed_weight_layers(layers: list[bnb.nn.Linear4bit]) -> list[bnb.nn.Linear4bit]:
    """The layers whose weight bitsandbytes has repacked for its CPU inference kernel."""
    return [
        layer
        for layer in layers
        if getattr(getattr(layer.weight, "quant_state", None), _CPU_PACKED_FLAG, False)
    ]


def _device_map() -> dict[str, int | str] | None:
    if not torch.cuda.is_available():
        return None  # bitsandbytes quantizes on the CPU in place
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return None  # FSDP places and shards the weights itself
    # One full copy per process: data-parallel ranks each take their own GPU.
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}


def load_quantized_base(cfg: ModelConfig) -> PreTrainedModel:
    """The base model in 4 bits, loaded as any hub model is (`from_pretrained`)."""
    source = resolve_source(cfg)
    attention = resolve_attention(cfg, source)
    configure_compile_cache(cfg.compile_cache)  # before anything compiles: training, generation, bench
    configure_flex_compile()  # any model may switch to flex attention later (the bench does)
    model_class, skips = loading_plan(source, cfg.revision, cfg.trust_remote_code)
    if cfg.trust_remote_code:
        log.warning("model.trust_remote_code=true: executing code shipped with %s", source)
    # Fused MoE experts refused, quantized or left as configured, and the router loss set, while
    # loading (qlora_exp/moe/).
    with fused_experts_loading(cfg):
        model = model_class.from_pretrained(
            source,
            revision=cfg.revision,
            quantization_config=build_quantization_config(cfg, skips),
            dtype=resolve_compute_dtype(cfg.bnb_4bit_compute_dtype),
            attn_implementation=attention,
            trust_remote_code=cfg.trust_remote_code,
            device_map=_device_map(),
        )
    disable_cpu_weight_repacking(model)
    return model


def check_liger(cfg: ModelConfig) -> None:
    """Liger's kernels are Triton: refuse them without a CUDA GPU, before weights load."""
    if cfg.use_liger_kernel and not torch.cuda.is_available():
        raise ConfigError(
            "model.use_liger_kernel: Liger's Triton kernels need a CUDA GPU and none is visible. "
            "Fix: model.use_liger_kernel=false on this machine"
        )


# Liger's kernels that run inside a decoder layer: off where the layers are compiled (layer_compile.py).
LIGER_LAYER_KERNELS = ("rms_norm", "rope", "geglu", "swiglu")


def apply_liger(model: PreTrainedModel, *, layer_kernels: bool = True) -> None:
    """Liger's kernels patched into `model` (transformers' helper); for the multimodal Gemma classes
    with Liger's fused loss off and the project's fused head-and-loss forward instead (fused_loss.py).
    `layer_kernels=False` keeps only the kernels outside the decoder layers (the fused LM head + loss)."""
    kernel_config = liger_kernel_config(model) or {}
    if not layer_kernels:
        kernel_config.update(dict.fromkeys(LIGER_LAYER_KERNELS, False))
    fused_here = uses_fused_loss_forward(model)
    if fused_here:
        kernel_config["fused_linear_cross_entropy"] = False
    apply_liger_kernel(model, kernel_config)
    if fused_here:
        fuse_head_and_loss(model, liger_causal_lm_loss())


def apply_speed_kernels(model: PreTrainedModel, cfg: ModelConfig) -> None:
    """Patch Liger's kernels into the loaded model, size its flex blocks and tiles and compile its
    layers, as configured."""
    set_flex_attention(model, cfg.flex_block_size, cfg.flex_kernel_options)
    if cfg.use_liger_kernel:
        apply_liger(model, layer_kernels=not cfg.compile_layers)
    if cfg.compile_layers:
        compile_decoder_layers(model)


# Non-reentrant checkpointing: the reentrant kind passes no gradient to LoRA weights whose inputs
# (the frozen layers' outputs) do not require one. Trainers that re-enable checkpointing take the same.
GRADIENT_CHECKPOINTING_KWARGS = {"use_reentrant": False}


def load_trainable_base(model_cfg: ModelConfig) -> PreTrainedModel:
    """4-bit base with the configured kernels, frozen and prepared for k-bit training."""
    check_liger(model_cfg)
    base = load_quantized_base(model_cfg)
    apply_speed_kernels(base, model_cfg)
    with experts_out_of_upcast(base):  # unquantized experts stay in the compute dtype (qlora_exp/moe/)
        base = peft.prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=model_cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs=dict(GRADIENT_CHECKPOINTING_KWARGS),
        )
    if model_cfg.uncheckpointed_layers:
        set_uncheckpointed_layers(base, model_cfg.uncheckpointed_layers)
    set_unquantized_precision(
        base,
        upcast=model_cfg.upcast_unquantized_params,
        fp32_residual=model_cfg.fp32_residual,
        compute_dtype=resolve_compute_dtype(model_cfg.bnb_4bit_compute_dtype),
    )
    return base


def attach_lora(base: PreTrainedModel, lora_cfg: LoraConfig) -> peft.PeftModel:
    """A fresh LoRA adapter on `base` (initialised from the current torch seed)."""
    config = build_lora_config(lora_cfg)
    target_lora(config, base, list(lora_cfg.target_modules))  # presets, fused experts
    model = peft.get_peft_model(base, exclude_non_text(config, base))
    trainable, total = model.get_nb_trainable_parameters()
    by_kind = ", ".join(f"{kind} {count:,}" for kind, count in count_trainable_by_kind(model).items())
    log.info(
        "LoRA: %d trainable of %d parameters (%.3f%%): %s", trainable, total, 100 * trainable / total, by_kind
    )
    return model


def attach_saved_adapter(base: PreTrainedModel, adapter_dir: Path) -> peft.PeftModel:
    """A saved adapter (a finished run's `adapter/`) on `base`, trainable, to train further."""
    model = load_adapter(base, adapter_dir, is_trainable=True)  # 4-bit experts' LoRA included
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA from %s: %d trainable of %d parameters", adapter_dir, trainable, total)
    return model


def build_quantized_model(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> peft.PeftModel:
    """4-bit base prepared for k-bit training (gradient checkpointing as configured) plus LoRA."""
    return attach_lora(load_trainable_base(model_cfg), lora_cfg)


def count_trainable_parameters(model: torch.nn.Module) -> int:
    """Number of parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapter(model: peft.PeftModel, tokenizer: PreTrainedTokenizerBase, run_dir: Path) -> None:
    """The trained adapter (safetensors) and tokenizer: what a user ships. Only the active adapter:
    a trainer may hold others beside it (TRL's DPO keeps a frozen reference copy)."""
    model.save_pretrained(
        str(run_dir / ADAPTER_DIR), safe_serialization=True, selected_adapters=[model.active_adapter]
    )
    tokenizer.save_pretrained(run_dir / TOKENIZER_DIR)
