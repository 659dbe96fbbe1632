"""Random-weight checkpoints of real architectures, built locally and saved as ordinary HF dirs.

No hub is reachable offline or in CI, so `model.name_or_path=embedded:tiny-gemma2` builds a tiny
Gemma-2 model plus a BPE tokenizer trained on the built-in data, saves both once to a cache
directory, and from then on the run loads them through the same `from_pretrained` call a hub
model takes. Step time and memory do not depend on weight values, so the same builder makes
full-size shapes (e.g. `embedded:gemma2-9b`) for GPU benchmarks. Architectures and names live in
`families.py` (the registry); the builder in `builder.py` reads only that.
"""

from qlora_exp.embedded.builder import (
    BUILDER_VERSION,
    EMBEDDED_PREFIX,
    build_checkpoint,
    is_embedded,
    resolve_embedded,
)
from qlora_exp.embedded.families import EMBEDDED_MODELS
from qlora_exp.embedded.registry import ChatConventions, EmbeddedModel, Family, Shape, TokenIds
from qlora_exp.embedded.tokenizer import train_tokenizer

__all__ = [
    "BUILDER_VERSION",
    "EMBEDDED_MODELS",
    "EMBEDDED_PREFIX",
    "ChatConventions",
    "EmbeddedModel",
    "Family",
    "Shape",
    "TokenIds",
    "build_checkpoint",
    "is_embedded",
    "resolve_embedded",
    "train_tokenizer",
]
