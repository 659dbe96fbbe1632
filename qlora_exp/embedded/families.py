"""The architectures the embedded builder knows, and the `embedded:NAME` checkpoints made of them.

Adding an architecture is one `Family` (its class, a config builder from transformers' own config
class, its chat conventions) and one `EMBEDDED_MODELS` entry per shape. Tiny shapes are what CI
trains end to end; full-size shapes (random weights) are for GPU benchmarks.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from qlora_exp.data.templates import (
    GEMMA3_CHAT_TEMPLATE,
    GEMMA4_CHAT_TEMPLATE,
    GEMMA4_E_CHAT_TEMPLATE,
    GEMMA_CHAT_TEMPLATE,
    LLAMA31_CHAT_TEMPLATE,
    MISTRAL_V03_CHAT_TEMPLATE,
    QWEN3_CHAT_TEMPLATE,
)
from qlora_exp.embedded.registry import (
    ChatConventions,
    EmbeddedModel,
    Family,
    Shape,
    TokenIds,
    text_config_kwargs,
)

GEMMA2_CHAT = ChatConventions(
    template=GEMMA_CHAT_TEMPLATE,
    special_tokens=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
    bos="<bos>",
    eos="<eos>",
    pad="<pad>",
    unk="<unk>",
    end_of_turn="<end_of_turn>",
    template_words=("user", "model", "system"),
)


def gemma2_config(shape: Shape, ids: TokenIds) -> Gemma2Config:
    """Gemma-2: soft-capped attention and final logits, alternating sliding-window layers."""
    return Gemma2Config(
        **text_config_kwargs(shape, ids),
        query_pre_attn_scalar=shape.head_dim,
        sliding_window=shape.sliding_window,
        max_position_embeddings=8192,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
    )


GEMMA2 = Family(Gemma2ForCausalLM, gemma2_config, GEMMA2_CHAT)

# Gemma-3's tokenizer (every size) carries the image tokens the multimodal sizes use.
GEMMA3_CHAT = ChatConventions(
    template=GEMMA3_CHAT_TEMPLATE,
    special_tokens=(
        *GEMMA2_CHAT.special_tokens,
        "<start_of_image>",
        "<end_of_image>",
        "<image_soft_token>",
    ),
    bos="<bos>",
    eos="<eos>",
    pad="<pad>",
    unk="<unk>",
    end_of_turn="<end_of_turn>",
    template_words=GEMMA2_CHAT.template_words,
)


def gemma3_text_config(shape: Shape, ids: TokenIds) -> Gemma3TextConfig:
    """Gemma-3's decoder: no soft-capping, 5 sliding-window layers to 1 global unless the shape says."""
    return Gemma3TextConfig(
        **text_config_kwargs(shape, ids),
        query_pre_attn_scalar=shape.head_dim,
        sliding_window=shape.sliding_window,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    )


def gemma3_config(shape: Shape, ids: TokenIds) -> Gemma3Config:
    """Gemma-3 4B/12B/27B: the decoder above, a SigLIP vision tower and its projector."""
    return Gemma3Config(
        text_config=gemma3_text_config(shape, ids),
        **shape.sub_configs,
        boi_token_index=ids.special["<start_of_image>"],
        eoi_token_index=ids.special["<end_of_image>"],
        image_token_index=ids.special["<image_soft_token>"],
        tie_word_embeddings=True,
    )


GEMMA3 = Family(Gemma3ForCausalLM, gemma3_text_config, GEMMA3_CHAT)
GEMMA3_MM = Family(Gemma3ForConditionalGeneration, gemma3_config, GEMMA3_CHAT)

_GEMMA4_TOKENS = (
    *GEMMA2_CHAT.special_tokens[:4],
    "<|turn>",
    "<turn|>",
    "<|channel>",
    "<channel|>",
    "<|think|>",
    "<|image>",
    "<image|>",
    "<|image|>",
    "<|audio>",
    "<audio|>",
    "<|audio|>",
    "<|video|>",
)


def _gemma4_chat(template: str) -> ChatConventions:
    return ChatConventions(
        template=template,
        special_tokens=_GEMMA4_TOKENS,
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        end_of_turn="<turn|>",
        template_words=GEMMA2_CHAT.template_words,
    )


def gemma4_text_config(shape: Shape, ids: TokenIds) -> Gemma4TextConfig:
    """Gemma-4's decoder: soft-capped final logits, wider global-attention heads (`global_head_dim`),
    per-layer input embeddings over the whole vocabulary where `hidden_size_per_layer_input` > 0."""
    return Gemma4TextConfig(
        **{
            "vocab_size_per_layer_input": shape.vocab_size or ids.vocab_size,
            **text_config_kwargs(shape, ids),
        },
        sliding_window=shape.sliding_window,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
    )


def gemma4_config(shape: Shape, ids: TokenIds) -> Gemma4Config:
    """Gemma-4 as released (every size): the decoder above with vision (and, E2B/E4B, audio) towers."""
    return Gemma4Config(
        text_config=gemma4_text_config(shape, ids),
        **shape.sub_configs,
        boi_token_id=ids.special["<|image>"],
        eoi_token_id=ids.special["<image|>"],
        image_token_id=ids.special["<|image|>"],
        video_token_id=ids.special["<|video|>"],
        boa_token_id=ids.special["<|audio>"],
        eoa_token_index=ids.special["<audio|>"],
        audio_token_id=ids.special["<|audio|>"],
        tie_word_embeddings=True,
    )


# The text class with the 26B/31B template; the multimodal class with E2B/E4B's (see templates.py).
GEMMA4 = Family(Gemma4ForCausalLM, gemma4_text_config, _gemma4_chat(GEMMA4_CHAT_TEMPLATE))
GEMMA4_MM = Family(Gemma4ForConditionalGeneration, gemma4_config, _gemma4_chat(GEMMA4_E_CHAT_TEMPLATE))

QWEN3_CHAT = ChatConventions(
    template=QWEN3_CHAT_TEMPLATE,
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
    eos="<|im_end|>",
    pad="<|endoftext|>",
    end_of_turn="<|im_end|>",
)


def qwen3_config(shape: Shape, ids: TokenIds) -> Qwen3Config:
    """Qwen3 (dense): grouped-query attention with q/k RMSNorm, no sliding window."""
    return Qwen3Config(**{"tie_word_embeddings": False, **text_config_kwargs(shape, ids)})


QWEN3 = Family(Qwen3ForCausalLM, qwen3_config, QWEN3_CHAT)


def qwen3_moe_config(shape: Shape, ids: TokenIds) -> Qwen3MoeConfig:
    """Qwen3-MoE: Qwen3's attention; every layer's MLP a router and fused experts (transformers 5),
    top-k routing weights renormalised as in the released models."""
    return Qwen3MoeConfig(
        **{"tie_word_embeddings": False, "norm_topk_prob": True, **text_config_kwargs(shape, ids)}
    )


QWEN3_MOE = Family(Qwen3MoeForCausalLM, qwen3_moe_config, QWEN3_CHAT)

# Llama-3.1-Instruct's tokenizer has no pad token (the loader pads with EOS, as users do).
LLAMA3_CHAT = ChatConventions(
    template=LLAMA31_CHAT_TEMPLATE,
    special_tokens=(
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ),
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    end_of_turn="<|eot_id|>",
)


def llama_config(shape: Shape, ids: TokenIds) -> LlamaConfig:
    """Llama-3.x: grouped-query attention, SwiGLU, untied output head."""
    return LlamaConfig(**{"tie_word_embeddings": False, **text_config_kwargs(shape, ids)})


LLAMA3 = Family(LlamaForCausalLM, llama_config, LLAMA3_CHAT)

# Mistral v0.3's tokenizer: no pad token either; [INST] ... [/INST] turns, answers end with </s>.
MISTRAL_CHAT = ChatConventions(
    template=MISTRAL_V03_CHAT_TEMPLATE,
    special_tokens=("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
    bos="<s>",
    eos="</s>",
    unk="<unk>",
    end_of_turn="</s>",
)


def mistral_config(shape: Shape, ids: TokenIds) -> MistralConfig:
    """Mistral v0.3: Llama's block with full attention (no sliding window since v0.2)."""
    return MistralConfig(
        **{"tie_word_embeddings": False, "sliding_window": None, **text_config_kwargs(shape, ids)}
    )


MISTRAL = Family(MistralForCausalLM, mistral_config, MISTRAL_CHAT)

# The tiny shapes CI trains: 2 layers of width 64 unless a feature needs more.
_TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "sliding_window": 32,
}
_SLIDING_THEN_GLOBAL = {"layer_types": ["sliding_attention", "full_attention"]}
_TINY_SIGLIP = {
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
        "vision_use_head": False,  # as Gemma-3's tower: its patch embeddings feed the projector
    },
    "mm_tokens_per_image": 4,
}
TINY_GEMMA4_TOWERS = {
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
    },
    "audio_config": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "output_proj_dims": 64,
    },
}

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "tiny-gemma2": EmbeddedModel(
        GEMMA2,
        Shape(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            sliding_window=256,
        ),
    ),
    # google/gemma-2-9b's shape (random weights), for benchmarks.
    "gemma2-9b": EmbeddedModel(
        GEMMA2,
        Shape(
            hidden_size=3584,
            intermediate_size=14336,
            num_hidden_layers=42,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            vocab_size=256000,
        ),
    ),
    "tiny-gemma3": EmbeddedModel(GEMMA3, Shape(**_TINY, options=_SLIDING_THEN_GLOBAL)),
    "tiny-gemma3-mm": EmbeddedModel(
        GEMMA3_MM, Shape(**_TINY, options=_SLIDING_THEN_GLOBAL, sub_configs=_TINY_SIGLIP)
    ),
    # 26B/31B-style decoder: global layers share keys and values (attention_k_eq_v), no per-layer inputs.
    "tiny-gemma4": EmbeddedModel(
        GEMMA4,
        Shape(
            **_TINY,
            options={
                **_SLIDING_THEN_GLOBAL,
                "global_head_dim": 32,
                "hidden_size_per_layer_input": 0,
                "attention_k_eq_v": True,
                "num_global_key_value_heads": 1,
            },
        ),
    ),
    # E2B/E4B-style: per-layer input embeddings and the last layers reusing earlier layers' keys and
    # values; 4 layers, the fewest where both attention kinds still have a layer that computes them.
    "tiny-gemma4-mm": EmbeddedModel(
        GEMMA4_MM,
        Shape(
            **{**_TINY, "num_hidden_layers": 4},
            options={
                "layer_types": ["sliding_attention", "full_attention"] * 2,
                "global_head_dim": 32,
                "hidden_size_per_layer_input": 16,
                "num_kv_shared_layers": 2,
            },
            sub_configs=TINY_GEMMA4_TOWERS,
        ),
    ),
    "tiny-qwen3": EmbeddedModel(QWEN3, Shape(**_TINY, options={"tie_word_embeddings": True})),
    "tiny-llama": EmbeddedModel(LLAMA3, Shape(**_TINY)),
    "tiny-mistral": EmbeddedModel(MISTRAL, Shape(**_TINY)),
    # 4 experts of width 32, 2 active per token, in each of the 2 layers.
    "tiny-qwen3-moe": EmbeddedModel(
        QWEN3_MOE,
        Shape(**_TINY, options={"moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2}),
    ),
    # google/gemma-3-4b-it's shape (SigLIP tower included), for benchmarks.
    "gemma3-4b": EmbeddedModel(
        GEMMA3_MM,
        Shape(
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=34,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            vocab_size=262208,
            sliding_window=1024,
            sub_configs={
                "vision_config": {
                    "hidden_size": 1152,
                    "intermediate_size": 4304,
                    "num_hidden_layers": 27,
                    "num_attention_heads": 16,
                    "image_size": 896,
                    "patch_size": 14,
                    "vision_use_head": False,
                },
                "mm_tokens_per_image": 256,
            },
        ),
    ),
    # google/gemma-4-E4B-it's shape (vision and audio towers at transformers' defaults, which are
    # E2B/E4B's), for benchmarks.
    "gemma4-e4b": EmbeddedModel(
        GEMMA4_MM,
        Shape(
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=42,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=256,
            vocab_size=262144,
            sliding_window=512,
            options={"global_head_dim": 512, "hidden_size_per_layer_input": 256, "num_kv_shared_layers": 18},
            sub_configs={"vision_config": {}, "audio_config": {}},
        ),
    ),
    # Qwen/Qwen3-30B-A3B's shape (its config.json), for benchmarks: 30.5B parameters, 3.3B active.
    "qwen3-30b-a3b": EmbeddedModel(
        QWEN3_MOE,
        Shape(
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            vocab_size=151936,
            options={
                "moe_intermediate_size": 768,
                "num_experts": 128,
                "num_experts_per_tok": 8,
                "max_position_embeddings": 40960,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        ),
    ),
    # Qwen/Qwen3-8B's shape, for benchmarks.
    "qwen3-8b": EmbeddedModel(
        QWEN3,
        Shape(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
        ),
    ),
}
