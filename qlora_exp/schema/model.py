"""Which base model to load and how to quantize it (`model`), and the LoRA adapter (`lora`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from qlora_exp.schema.checks import require, require_choice

COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")


def flex_block_size_problem(attn_implementation: str, size: int | None) -> str | None:
    """Why `size` cannot be flex attention's block size under `attn_implementation` (None: it can).
    The GPU's own limit (its kernel tiles) is checked at load: attention.check_flex_tiles."""
    if size is None:
        return None
    if attn_implementation != "flex_attention":
        return f"is {size} but the attention is {attn_implementation}, which has no block mask"
    if size < 16 or size % 16:
        return f"must be a positive multiple of 16, got {size}"
    return None


# flex_attention's kernel_options that change only speed, by the kernels they apply to: its tiles,
# warps, pipeline stages and TMA loads. Options that change results (PRESCALE_QK rounds differently,
# ROWS_GUARANTEED_SAFE skips a guard) are not passed.
FLEX_TILE_OPTIONS = {
    "BLOCK_M": ("fwd",),
    "BLOCK_N": ("fwd",),
    **dict.fromkeys(("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"), ("bwd",)),
}
FLEX_KERNEL_OPTIONS = {
    **FLEX_TILE_OPTIONS,
    **dict.fromkeys(("num_warps", "num_stages", "USE_TMA"), ("fwd", "bwd")),
}
TORCH_FLEX_BLOCK_SIZE = 128  # torch's block mask default (model.flex_block_size=null)


def flex_kernel_options_problem(attn_implementation: str, block_size: int | None, options: Any) -> str | None:
    """Why `options` cannot be flex attention's kernel options (None: they can). Each is one of
    FLEX_KERNEL_OPTIONS, alone (every kernel it applies to) or as fwd_NAME / bwd_NAME; a tile must
    divide the block (`block_size`, or torch's 128) and the backward's tiles nest as its kernel asserts."""
    if options is None or options == {}:
        return None
    if not isinstance(options, Mapping):
        return f"must be a mapping of option names to values, e.g. {{bwd_num_warps: 8}}, got {options!r}"
    if attn_implementation != "flex_attention":
        return f"are set but the attention is {attn_implementation}, which has no flex kernels"
    for key, value in options.items():
        if problem := _flex_option_problem(key, value, block_size or TORCH_FLEX_BLOCK_SIZE):
            return problem
    tiles = {key.removeprefix("bwd_"): value for key, value in options.items()}
    if tiles.get("BLOCK_N1", 0) % tiles.get("BLOCK_M1", 1) or tiles.get("BLOCK_M2", 0) % tiles.get(
        "BLOCK_N2", 1
    ):
        return "the backward's tiles must nest: BLOCK_N1 a multiple of BLOCK_M1, BLOCK_M2 of BLOCK_N2"
    return None


def _flex_option_problem(key: str, value: Any, block_size: int) -> str | None:
    """What is wrong with one flex kernel option (None: nothing)."""
    direction, _, name = key.partition("_") if key.startswith(("fwd_", "bwd_")) else ("", "", key)
    if name not in FLEX_KERNEL_OPTIONS or (direction and direction not in FLEX_KERNEL_OPTIONS[name]):
        names = ", ".join(f"{n} ({'/'.join(FLEX_KERNEL_OPTIONS[n])})" for n in FLEX_KERNEL_OPTIONS)
        return (
            f"has {key!r}, not a speed option of flex attention's kernels; these are {names}, "
            "alone or as fwd_NAME/bwd_NAME"
        )
    if name == "USE_TMA":
        return None if isinstance(value, bool) else f"{key} must be true or false, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"{key} must be a positive integer, got {value!r}"
    if name in FLEX_TILE_OPTIONS and (value < 16 or value & (value - 1) or block_size % value):
        return f"{key}={value}: a tile must be a power of two >= 16 dividing the {block_size}-position blocks"
    return None


@dataclass
class ModelConfig:
    """Which base model to load and how to quantize it."""

    # The one place a model's name lives. `embedded:tiny-gemma2` is built locally (no hub).
    name_or_path: str = MISSING
    revision: str | None = None
    trust_remote_code: bool = False
    # The language model's attention. A multimodal checkpoint's vision/audio towers take eager, which
    # every tower has and text-only training never runs (qlora_exp/multimodal.py).
    attn_implementation: str = "eager"
    load_in_4bit: bool = True
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "auto"
    # FSDP shards 4-bit weights only when they are stored in the compute dtype.
    bnb_4bit_quant_storage: str | None = None
    gradient_checkpointing: bool = True
    # With gradient checkpointing: the last N decoder layers keep their activations for the backward
    # instead of recomputing them, each one layer's forward faster per step for one layer's
    # activations of memory (qlora_exp/layer_compile.py: set_uncheckpointed_layers).
    uncheckpointed_layers: int = 0
    # Liger's Triton kernels for this architecture (RMSNorm, RoPE, GeGLU/SwiGLU, and a fused
    # linear + cross-entropy loss that never materialises the vocabulary-sized logits). CUDA only.
    use_liger_kernel: bool = False
    # peft's prepare_model_for_kbit_training casts every unquantized parameter (embeddings, norms)
    # to fp32, which puts the whole residual stream in fp32. false casts them back to the compute
    # dtype: less memory and fewer dtype conversions per layer (Liger's RMSNorm still sums in fp32).
    upcast_unquantized_params: bool = True
    # With upcast_unquantized_params=false: keep the residual stream (the embedding output, every
    # layer's sums and the outputs of the projections that write into it) in fp32 while the weights,
    # attention, the MLPs and the LM head's input stay in the compute dtype. LoRA's small early
    # updates survive the fp32 sums, as with the fp32 upcast, without fp32 embeddings, an fp32 LM
    # head, fp32 blocks or their memory. BENCHMARKS.md.
    fp32_residual: bool = False
    # Mixture-of-experts models (qlora_exp/moe/): the fused experts in 4 bits like every linear weight.
    # false keeps them unquantized, explicitly; a MoE layout that cannot be quantized is refused.
    quantize_experts: bool = True
    # The router's load-balancing loss, added to the loss by transformers (output_router_logits):
    # with the model's own coefficient, or router_aux_loss_coef when given.
    router_aux_loss: bool = False
    router_aux_loss_coef: float | None = None
    # torch.compile's caches (compiled flex attention, Triton kernels) under
    # $QLORA_EXP_CACHE/compile/, one directory per torch/Triton/transformers/... version, so that a
    # sweep's later jobs load what its first job compiled (qlora_exp/cache.py). false: torch's defaults.
    compile_cache: bool = True
    # torch.compile over each decoder layer while it trains: Inductor fuses the casts, adds, norms and
    # LoRA's elementwise work around the matmuls (qlora_exp/layer_compile.py). CUDA only; Liger's kernels
    # then stay outside the layers (its fused LM head and loss remain).
    compile_layers: bool = False
    # Flex attention's block mask in blocks of this many positions (null: torch's 128). Smaller blocks
    # skip more of what a padding-free row's mask rules out; flex's kernel tiles must divide it
    # (qlora_exp/attention.py: 64 fits 256-wide heads on an H100/H200, not 128-wide ones).
    flex_block_size: int | None = None
    # torch's flex_attention kernel_options for this model's flex calls (null: torch's tiles for the
    # GPU): speed only (FLEX_KERNEL_OPTIONS), e.g. {bwd_num_warps: 8}. Tuned per GPU and head width:
    # benchmarks/flex_tiles.py times candidates; docs/models.md. A mapping or null, typed Any: OmegaConf
    # cannot assign a mapping (model.flex_kernel_options={...}) to an Optional[Dict] field holding null.
    flex_kernel_options: Any = None

    def __post_init__(self) -> None:
        require(bool(self.name_or_path), "model.name_or_path", "is empty", "name a hub id or a local dir")
        require(
            self.router_aux_loss_coef is None or self.router_aux_loss,
            "model.router_aux_loss_coef",
            "is set but model.router_aux_loss=false, so no load-balancing loss is added",
            "also set model.router_aux_loss=true, or drop the coefficient",
        )
        require(
            self.router_aux_loss_coef is None or self.router_aux_loss_coef >= 0,
            "model.router_aux_loss_coef",
            f"must be >= 0, got {self.router_aux_loss_coef}",
            "use e.g. 0.001, or null for the model's own",
        )
        # peft's k-bit preparation casts every unquantized weight to fp32: unquantized experts would
        # take 4 bytes per parameter (~116 GB for Qwen3-30B-A3B).
        require(
            self.quantize_experts or not self.upcast_unquantized_params,
            "model.quantize_experts",
            "false keeps the experts unquantized, and model.upcast_unquantized_params=true would cast "
            "them to fp32",
            "also set model.upcast_unquantized_params=false (experts in the compute dtype)",
        )
        require(
            self.uncheckpointed_layers >= 0,
            "model.uncheckpointed_layers",
            f"must be >= 0, got {self.uncheckpointed_layers}",
            "0 checkpoints every layer",
        )
        require(
            self.gradient_checkpointing or not self.uncheckpointed_layers,
            "model.uncheckpointed_layers",
            f"is {self.uncheckpointed_layers} but model.gradient_checkpointing=false, so every layer "
            "keeps its activations already",
            "model.uncheckpointed_layers=0, or model.gradient_checkpointing=true",
        )
        require_choice(self.attn_implementation, "model.attn_implementation", ATTN_IMPLEMENTATIONS)
        problem = flex_block_size_problem(self.attn_implementation, self.flex_block_size)
        require(
            problem is None,
            "model.flex_block_size",
            problem or "",
            "a multiple of 16 (64, or torch's 128) with model.attn_implementation=flex_attention, or null",
        )
        problem = flex_kernel_options_problem(
            self.attn_implementation, self.flex_block_size, self.flex_kernel_options
        )
        require(
            problem is None,
            "model.flex_kernel_options",
            problem or "",
            "only speed options of flex attention's kernels (e.g. {bwd_num_warps: 8}) with "
            "model.attn_implementation=flex_attention, or null for torch's own",
        )
        require_choice(self.bnb_4bit_quant_type, "model.bnb_4bit_quant_type", ("nf4", "fp4"))
        require_choice(self.bnb_4bit_compute_dtype, "model.bnb_4bit_compute_dtype", COMPUTE_DTYPES)
        if self.bnb_4bit_quant_storage is not None:
            require_choice(
                self.bnb_4bit_quant_storage, "model.bnb_4bit_quant_storage", (*COMPUTE_DTYPES[1:], "uint8")
            )
            require(
                self.bnb_4bit_quant_storage in ("uint8", self.bnb_4bit_compute_dtype),
                "model.bnb_4bit_quant_storage",
                f"{self.bnb_4bit_quant_storage} differs from model.bnb_4bit_compute_dtype="
                f"{self.bnb_4bit_compute_dtype}, so FSDP would see mixed dtypes",
                "set both to the same dtype (e.g. bfloat16), or leave quant storage unset without FSDP",
            )


@dataclass
class LoraConfig:
    """LoRA adapter shape (peft)."""

    r: int = 16
    alpha: int = 32
    # 0, as peft's own default: dropout on every LoRA input cost ~10% of a Gemma-2-9B step on an H200
    # (BENCHMARKS.md) and keeps Inductor from fusing LoRA into its neighbours (model.compile_layers).
    dropout: float = 0.0
    # ["all-linear"] targets every linear layer except the output head (peft's shorthand).
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    bias: str = "none"
    use_rslora: bool = False
    # Whole modules trained and saved beside the adapter, e.g. [embed_tokens] (peft's modules_to_save);
    # a tied output head stays tied to the trained copy.
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(self.r > 0, "lora.r", f"must be positive, got {self.r}", "use e.g. lora.r=16")
        require(self.alpha > 0, "lora.alpha", f"must be positive, got {self.alpha}", "use e.g. lora.alpha=32")
        require(
            0.0 <= self.dropout < 1.0,
            "lora.dropout",
            f"must be in [0, 1), got {self.dropout}",
            "use e.g. 0.05",
        )
        require(bool(self.target_modules), "lora.target_modules", "is empty", "use [all-linear] or names")
        # Presets (qlora_exp/moe/lora.py): all-linear (= all), attention, experts, joined with `+`.
        for everything in {"all", "all-linear"} & set(self.target_modules):
            require(
                len(self.target_modules) == 1,
                "lora.target_modules",
                f"{everything} already targets every linear layer and the fused experts, "
                f"so {list(self.target_modules)} lists more than it",
                "use [all-linear] alone, or name what to target, e.g. [attention+experts]",
            )
        require_choice(self.bias, "lora.bias", ("none", "all", "lora_only"))

    @property
    def scale(self) -> float:
        """The factor LoRA's update is multiplied by: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)
