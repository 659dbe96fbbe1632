"""The untrained model's evaluation and held-out generations, computed once and shared by a sweep.

Why sharing is exact: peft initialises LoRA's B to zero (its default, the only initialisation the
schema offers), so before the first optimizer step every adapted layer adds exact zeros to its base
output: the adapted model computes the base model's numbers bit for bit, whatever the rank, alpha,
rsLoRA scale, dropout (off in evaluation) or target modules, and whatever the optimizer, learning
rate or schedule. The step-0 evaluation and the greedy generations before training therefore
depend only on what `baseline_cache` puts in the key: the base model and how it is loaded, the
tokenized data (its cache key), the LoRA settings that do change the model (bias, modules_to_save),
the method, the evaluation settings, the seed, the library versions, this package's source and the
device. Job 2 of a rank x learning-rate sweep reads what job 1 computed; run-directory files,
metrics and W&B logs are written as if it had computed them, and the log says where they came from.

Not shared: a run continuing a trained adapter (method.init_from), sampled generations (their
random state depends on the adapter's initialisation, which draws more numbers for a larger rank),
data-parallel runs (every rank must take the same path through the collective evaluation), and
every evaluation after step 0.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from qlora_exp.cache import cache_root, content_key, library_versions, read_json_entry, write_json_entry
from qlora_exp.rng import isolated_rng
from qlora_exp.run.directory import TRACKED_PACKAGES
from qlora_exp.run.distributed import world_size
from qlora_exp.schema import Config, to_plain_dict

log = logging.getLogger(__name__)

BASELINE_DIR = "baseline"
# Bump when what an entry holds, or how it is computed, changes in a way the key does not see.
BASELINE_VERSION = 1
EVALUATION = "evaluation.json"  # the step-0 evaluation's metrics, as Trainer.evaluate returns them
GENERATIONS = "generations_before.json"  # the held-out generations before training
# LoRA settings that cannot change the untrained adapted model (B = 0 makes every LoRA output zero).
LORA_KEYS_WITHOUT_EFFECT = ("r", "alpha", "dropout", "use_rslora", "target_modules")
# Switches that decide where things are cached, not what is computed.
MODEL_KEYS_WITHOUT_EFFECT = ("compile_cache",)
PACKAGE_ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class BaselineCache:
    """One key's entry: a directory of JSON files (EVALUATION, GENERATIONS)."""

    directory: Path

    def load(self, name: str) -> Any | None:
        """The stored value, or None when no earlier job stored it."""
        value = read_json_entry(self.directory / name)
        if value is not None:
            log.info("baseline cache: %s read from %s (computed by an earlier job)", name, self.directory)
        return value

    def save(self, name: str, value: Any) -> None:
        """Store `value` for the next job; a full disk or a read-only cache only costs the next job time."""
        try:
            write_json_entry(self.directory / name, value)
        except OSError as exc:
            log.info("baseline cache: not storing %s (%s)", name, exc)


def source_fingerprint() -> str:
    """sha256 over this package's Python sources: a code change (a precision hook, a collator) never
    reuses a baseline an older version computed."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def device_fingerprint() -> dict[str, Any]:
    """The accelerator the numbers were computed on (a cache shared by a cluster's nodes may see several)."""
    if torch.cuda.is_available():
        return {
            "cuda": torch.version.cuda,
            "name": torch.cuda.get_device_name(),
            "capability": torch.cuda.get_device_capability(),
        }
    return {"cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def baseline_cache(cfg: Config, data_key: str) -> BaselineCache | None:
    """The entry for this run's untrained model, or None (logged) where it cannot be shared."""
    if not cfg.baseline_cache:
        return None
    if cfg.method.init_from is not None or cfg.method.preference or world_size() > 1:
        log.info(
            "baseline cache: not used by this run (%s); it evaluates before training itself",
            "a trained adapter" if cfg.method.init_from else "data parallel" if world_size() > 1 else "DPO",
        )
        return None
    lora = {k: v for k, v in to_plain_dict(cfg.lora).items() if k not in LORA_KEYS_WITHOUT_EFFECT}
    model = {k: v for k, v in to_plain_dict(cfg.model).items() if k not in MODEL_KEYS_WITHOUT_EFFECT}
    key = content_key(
        version=BASELINE_VERSION,
        data=data_key,
        seed=cfg.seed,
        model=model,
        lora=lora,
        method=to_plain_dict(cfg.method),
        eval=to_plain_dict(cfg.eval),
        eval_batch_size=cfg.trainer.per_device_eval_batch_size,
        precision=cfg.trainer.precision,
        packages=library_versions((*TRACKED_PACKAGES, "liger-kernel", "triton")),
        source=source_fingerprint(),
        device=device_fingerprint(),
    )
    return BaselineCache(cache_root() / BASELINE_DIR / key)


class BaselineEvaluationMixin:
    """The step-0 evaluation (`eval_on_start`) from the `baseline` cache when an earlier job stored it.

    Mix in before the Trainer class. A cached evaluation is logged and passed to the callbacks the
    way Trainer.evaluate does, so log_history.json, metrics.json and W&B get the same entries.
    """

    baseline: BaselineCache | None = None

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        trainer: Trainer = self  # type: ignore[assignment]  # a mixin of Trainer subclasses
        evaluate = super().evaluate  # type: ignore[misc]
        if trainer.state.global_step != 0 or eval_dataset is not None or metric_key_prefix != "eval":
            return evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        with isolated_rng():
            cached = self.baseline.load(EVALUATION) if self.baseline else None
            if cached is None:
                metrics: dict[str, float] = evaluate(eval_dataset, ignore_keys, metric_key_prefix)
                if self.baseline:
                    self.baseline.save(EVALUATION, metrics)
                return metrics
        trainer.log(dict(cached))
        trainer.control = trainer.callback_handler.on_evaluate(
            trainer.args, trainer.state, trainer.control, cached
        )
        return dict(cached)
