"""A byte-level BPE tokenizer trained locally, with a family's special tokens and chat template."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from qlora_exp.data.synthetic import generate_synthetic_examples
from qlora_exp.embedded.registry import ChatConventions


def train_tokenizer(
    vocab_size: int, chat: ChatConventions, seed: int = 0, corpus: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus` (default: the built-in data), with `chat`'s
    special tokens and turn template."""
    if corpus is None:
        corpus = [
            f"{row['instruction']}\n{row['input']}\n{row['output']}"
            for row in generate_synthetic_examples(4000, seed=seed, zh_fraction=0.5)
        ]
    tokenizer = Tokenizer(models.BPE(unk_token=chat.unk))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(chat.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*corpus, *chat.template_words], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=chat.bos,
        eos_token=chat.eos,
        pad_token=chat.pad,
        unk_token=chat.unk,
        additional_special_tokens=chat.additional_special_tokens,
        padding_side="right",
    )
    fast.chat_template = chat.template
    return fast
