"""The architectures the embedded builder knows, and the `embedded:NAME` checkpoints made of them.

Adding an architecture is one `Family` (its class, a config builder from transformers' own config
class, its chat conventions) and one `EMBEDDED_MODELS` entry per shape. Tiny shapes are what CI
trains end to end; full-size shapes (random weights) are for GPU benchmarks.
"""

from __future__ import annotations

from transformers import Gemma2Config, Gemma2ForCausalLM

from qlora_exp.data.templates import GEMMA_CHAT_TEMPLATE
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
}
