"""Random-weight checkpoints of real architectures, built locally and saved as ordinary HF dirs.

No hub is reachable offline or in CI, so `model.name_or_path=embedded:tiny-gemma2` builds a tiny
Gemma-2 model plus a BPE tokenizer trained on the built-in data, saves both once to a cache
directory, and from then on the run loads them through the same `from_pretrained` call a hub
model takes. Step time and memory do not depend on weight values, so the same builder makes
full-size shapes (e.g. `embedded:gemma2-9b`) for GPU benchmarks.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Gemma2Config, Gemma2ForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from qlora_exp.cache import cache_root
from qlora_exp.data.synthetic import generate_synthetic_examples
from qlora_exp.data.templates import GEMMA_CHAT_TEMPLATE
from qlora_exp.errors import ConfigError

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
# Bump when the builder's output changes, so stale caches are rebuilt rather than reused.
BUILDER_VERSION = 1
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


@dataclass(frozen=True)
class Architecture:
    """Shape of a Gemma-2 model; the vocabulary is the embedded tokenizer's unless given."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int | None = None
    tokenizer_vocab_size: int = 1024
    sliding_window: int = 4096


ARCHITECTURES: dict[str, Architecture] = {
    "tiny-gemma2": Architecture(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        sliding_window=256,
    ),
    # google/gemma-2-9b's shape (random weights), for benchmarks.
    "gemma2-9b": Architecture(
        hidden_size=3584,
        intermediate_size=14336,
        num_hidden_layers=42,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        vocab_size=256000,
    ),
}


def is_embedded(name_or_path: str) -> bool:
    """True for names the embedded builder serves (`embedded:NAME`)."""
    return name_or_path.startswith(EMBEDDED_PREFIX)


def resolve_embedded(name_or_path: str) -> Path:
    """Directory of the embedded checkpoint `embedded:NAME`, built on first use."""
    name = name_or_path.removeprefix(EMBEDDED_PREFIX)
    if name not in ARCHITECTURES:
        raise ConfigError(
            f"model.name_or_path: unknown embedded model {name!r}. Fix: use one of "
            + ", ".join(EMBEDDED_PREFIX + n for n in ARCHITECTURES)
        )
    target = cache_root() / "embedded" / f"{name}-v{BUILDER_VERSION}"
    if not (target / "config.json").is_file():
        build_checkpoint(name, target)
    return target


def train_tokenizer(
    vocab_size: int, seed: int = 0, corpus: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus` (default: the built-in data), with Gemma's special
    tokens and turn template."""
    if corpus is None:
        corpus = [
            f"{row['instruction']}\n{row['input']}\n{row['output']}"
            for row in generate_synthetic_examples(4000, seed=seed, zh_fraction=0.5)
        ]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*corpus, "user", "model", "system"], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        padding_side="right",
    )
    fast.chat_template = GEMMA_CHAT_TEMPLATE
    return fast


@contextmanager
def isolated_rng(cuda: bool) -> Iterator[None]:
    """Python's, NumPy's and torch's generators restored on exit, whatever ran inside.

    The builder seeds its own weights, but it runs inside a training process on a cold cache,
    after `set_seed(seed)`: without this, the first run on a machine would initialise LoRA and
    draw dropout from other random numbers than every later run with the same seed.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if cuda else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def build_checkpoint(name: str, target: Path) -> None:
    """Build `name` with seeded random weights and save it atomically to `target`; the caller's
    random generators are left as they were."""
    arch = ARCHITECTURES[name]
    # Full-size shapes are initialised in bf16 on the GPU when there is one: seconds, where the
    # CPU takes minutes for 9B parameters. Benchmarks need the shape, not particular values.
    device = "cuda" if arch.vocab_size is not None and torch.cuda.is_available() else "cpu"
    with isolated_rng(cuda=device == "cuda"):
        _build(name, arch, target, device)


def _build(name: str, arch: Architecture, target: Path, device: str) -> None:
    log.info("building embedded checkpoint %s in %s (once; cached afterwards)", name, target)
    tokenizer = train_tokenizer(arch.tokenizer_vocab_size)
    end_of_turn = int(tokenizer.convert_tokens_to_ids("<end_of_turn>"))  # type: ignore[arg-type]
    config = Gemma2Config(
        vocab_size=arch.vocab_size or len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        query_pre_attn_scalar=arch.head_dim,
        sliding_window=arch.sliding_window,
        max_position_embeddings=8192,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, end_of_turn],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    dtype = torch.float32 if arch.vocab_size is None else torch.bfloat16
    if device == "cuda":
        with torch.device(device):
            model = Gemma2ForCausalLM._from_config(config, dtype=dtype)
    else:
        with torch.device("cpu"):
            model = Gemma2ForCausalLM(config).to(dtype)  # type: ignore[arg-type]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, end_of_turn],
        pad_token_id=tokenizer.pad_token_id,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same build first; its copy is identical (seeded).
            log.info("embedded checkpoint %s was built concurrently; using that copy", name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
