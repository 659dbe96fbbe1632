"""What an embedded checkpoint is made of: a family (model class, config, tokenizer conventions) and a shape.

A family is one `Family` value; a checkpoint name is one `EmbeddedModel(family, shape)` entry in
`families.EMBEDDED_MODELS`. The builder reads nothing else, so adding an architecture touches no code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ChatConventions:
    """A family's special tokens and turn format, as its released instruct tokenizer has them.

    `special_tokens` lists them in vocabulary order (the first ids); `bos`/`eos`/`pad`/`unk` name
    members of it (None where the family has none: Llama-3 ships no pad, Qwen no BOS). Generation
    stops on `eos` and on `end_of_turn`, as the released generation configs do.
    """

    template: str
    special_tokens: tuple[str, ...]
    eos: str
    end_of_turn: str
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    # Words the template writes (role names): trained into the vocabulary so a turn header is a few
    # tokens, as in a real tokenizer, rather than spelled out byte by byte.
    template_words: tuple[str, ...] = ("user", "assistant", "system")

    @property
    def additional_special_tokens(self) -> list[str]:
        """The special tokens that are not BOS, EOS, pad or unknown (turn markers, image tokens...)."""
        named = {self.bos, self.eos, self.pad, self.unk}
        return [token for token in self.special_tokens if token not in named]


@dataclass(frozen=True)
class Shape:
    """Sizes of one checkpoint; `vocab_size` None means the embedded tokenizer's own (tiny models).

    `options` are further config keyword arguments for this checkpoint only (e.g. an MoE's expert
    count), passed to the family's config builder; `sub_configs` are the keyword arguments a
    multimodal family's outer config takes beside its text config (`vision_config` as a dict, ...).
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int | None = None
    tokenizer_vocab_size: int = 1024
    sliding_window: int = 4096
    options: Mapping[str, Any] = field(default_factory=dict)
    sub_configs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def full_size(self) -> bool:
        """A real model's shape (its own vocabulary), built for benchmarks rather than tests."""
        return self.vocab_size is not None


@dataclass(frozen=True)
class TokenIds:
    """The ids a config needs from the trained tokenizer."""

    vocab_size: int
    bos: int | None
    pad: int | None
    stop: list[int]  # EOS, then the end-of-turn token where it differs
    special: Mapping[str, int]  # every special token's id (image tokens for multimodal configs)

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, chat: ChatConventions) -> TokenIds:
        """Read the ids of `chat`'s tokens from `tokenizer`."""
        special: dict[str, int] = {}
        for token in chat.special_tokens:
            token_id = tokenizer.convert_tokens_to_ids(token)
            assert isinstance(token_id, int)  # one token in, one id out
            special[token] = token_id
        stop = list(dict.fromkeys([special[chat.eos], special[chat.end_of_turn]]))
        return cls(
            vocab_size=len(tokenizer),
            bos=special[chat.bos] if chat.bos else None,
            pad=special[chat.pad] if chat.pad else None,
            stop=stop,
            special=special,
        )

    def config_kwargs(self, shape: Shape) -> dict[str, Any]:
        """Vocabulary size and special ids, as every text config takes them."""
        return {
            "vocab_size": shape.vocab_size or self.vocab_size,
            "pad_token_id": self.pad,
            "bos_token_id": self.bos,
            "eos_token_id": self.stop,
        }


def text_config_kwargs(shape: Shape, ids: TokenIds) -> dict[str, Any]:
    """Keyword arguments every decoder-only config in transformers takes, from `shape` and `ids`."""
    return {
        **ids.config_kwargs(shape),
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim,
        **shape.options,
    }


@dataclass(frozen=True)
class Family:
    """One architecture: the class the checkpoint declares, how its config is made, its tokenizer."""

    model_class: type[PreTrainedModel]
    build_config: Callable[[Shape, TokenIds], PretrainedConfig]
    chat: ChatConventions


@dataclass(frozen=True)
class EmbeddedModel:
    """One `embedded:NAME` checkpoint."""

    family: Family
    shape: Shape
