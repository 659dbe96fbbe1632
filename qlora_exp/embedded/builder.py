"""Build an `embedded:NAME` checkpoint once, seeded, and save it atomically to the cache."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import GenerationConfig

from qlora_exp.cache import EMBEDDED_DIR, cache_root
from qlora_exp.embedded.families import EMBEDDED_MODELS
from qlora_exp.embedded.registry import EmbeddedModel, TokenIds
from qlora_exp.embedded.tokenizer import train_tokenizer
from qlora_exp.errors import ConfigError
from qlora_exp.rng import isolated_rng

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
# Bump when the builder's output for an existing name changes, so stale caches are rebuilt rather
# than reused. A new name needs no bump: each name has its own cache directory.
BUILDER_VERSION = 1


def is_embedded(name_or_path: str) -> bool:
    """True for names the embedded builder serves (`embedded:NAME`)."""
    return name_or_path.startswith(EMBEDDED_PREFIX)


def resolve_embedded(name_or_path: str) -> Path:
    """Directory of the embedded checkpoint `embedded:NAME`, built on first use."""
    name = name_or_path.removeprefix(EMBEDDED_PREFIX)
    if name not in EMBEDDED_MODELS:
        raise ConfigError(
            f"model.name_or_path: unknown embedded model {name!r}. Fix: use one of "
            + ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)
        )
    target = cache_root() / EMBEDDED_DIR / f"{name}-v{BUILDER_VERSION}"
    if not (target / "config.json").is_file():
        build_checkpoint(name, target)
    return target


def build_checkpoint(name: str, target: Path) -> None:
    """Build `name` with seeded random weights and save it atomically to `target`; the caller's
    random generators are left as they were."""
    model = EMBEDDED_MODELS[name]
    # Full-size shapes are initialised in bf16 on the GPU when there is one: seconds, where the
    # CPU takes minutes for 9B parameters. Benchmarks need the shape, not particular values.
    device = "cuda" if model.shape.full_size and torch.cuda.is_available() else "cpu"
    with isolated_rng():
        _build(name, model, target, device)


def _build(name: str, embedded: EmbeddedModel, target: Path, device: str) -> None:
    log.info("building embedded checkpoint %s in %s (once; cached afterwards)", name, target)
    family, shape = embedded.family, embedded.shape
    tokenizer = train_tokenizer(shape.tokenizer_vocab_size, family.chat)
    ids = TokenIds.of(tokenizer, family.chat)
    config = family.build_config(shape, ids)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if shape.full_size else torch.float32
    if device == "cuda":
        with torch.device(device):
            model = family.model_class._from_config(config, dtype=dtype)
    else:
        with torch.device("cpu"):
            model = family.model_class(config).to(dtype)  # type: ignore[arg-type]
    model.generation_config = GenerationConfig(
        bos_token_id=ids.bos, eos_token_id=ids.stop, pad_token_id=ids.pad
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
