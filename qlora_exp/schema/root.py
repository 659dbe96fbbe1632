"""The whole experiment (`Config`), its registration in Hydra's ConfigStore, and the conversion of a
composed config into validated objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qlora_exp.errors import ConfigError
from qlora_exp.schema.checks import require
from qlora_exp.schema.data import PREFERENCE_FORMATS, DataConfig
from qlora_exp.schema.model import LoraConfig, ModelConfig
from qlora_exp.schema.tracking import TrackingConfig
from qlora_exp.schema.training import EvalConfig, MethodConfig, TrainerConfig

# The config tree (conf/), beside the package in the source tree (installed editable by `make install`).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class Config:
    """The whole experiment: one section per config group, plus the seed."""

    seed: int = 42
    dry_run: bool = False  # load and tokenize the data only, print a preview, train nothing
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    # A run directory to continue (conf/config.yaml makes it the Hydra run dir); rerunning with
    # hydra.run.dir=RUN_DIR does the same. A changed config that matters is refused unless forced.
    resume: str | None = None
    resume_force: bool = False
    # Share the untrained model's evaluation and greedy held-out generations between runs that would
    # compute exactly the same ones, e.g. a rank x learning-rate sweep's jobs (qlora_exp/baseline.py).
    baseline_cache: bool = True
    # This run's peak GPU memory in GiB as measured (metrics.json's peak_memory_gb), when known: how
    # hydra/launcher=gpu_share sizes the jobs sharing one GPU. A run that peaks higher warns.
    peak_memory_gb: float | None = None

    def __post_init__(self) -> None:
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}", "use e.g. seed=42")
        require(
            self.peak_memory_gb is None or self.peak_memory_gb > 0,
            "peak_memory_gb",
            f"must be positive, got {self.peak_memory_gb}",
            "use a run's measured peak_memory_gb (metrics.json), or null",
        )
        require(
            not self.eval.samples_every_eval or self.trainer.eval_steps > 0,
            "eval.samples_every_eval",
            "needs evaluations during training, but trainer.eval_steps=0",
            "set trainer.eval_steps, e.g. trainer.eval_steps=50",
        )
        if self.method.preference:
            self._check_preference_data()
            # TRL's trainer enables checkpointing on every layer again when it starts.
            require(
                not self.model.uncheckpointed_layers,
                "model.uncheckpointed_layers",
                f"is {self.model.uncheckpointed_layers}, but {self.method.name}'s trainer (TRL) checkpoints "
                "every layer again when it starts",
                "model.uncheckpointed_layers=0 with a preference method",
            )
        else:
            require(
                self.data.format != "preference",
                "data.format",
                f"preference pairs need a preference method, but method={self.method.name}",
                "train them with method=dpo, or pick a supervised format",
            )

    def _check_preference_data(self) -> None:
        """What DPO's data cannot do: formats without chosen/rejected, prompt training, flattening."""
        method = f"method={self.method.name}"
        for ok, key, problem, fix in (
            (
                self.data.format in PREFERENCE_FORMATS,
                "data.format",
                f"{self.data.format} has no chosen/rejected answers to compare under {method}",
                f"use one of {', '.join(PREFERENCE_FORMATS)}",
            ),
            (
                not self.data.train_on_prompt,
                "data.train_on_prompt",
                f"{method} compares the chosen and rejected answers; the prompt is never trained",
                "leave data.train_on_prompt=false",
            ),
            (  # TRL 1.16's DPOTrainer has padding-free batches switched off ("temporarily unavailable")
                self.data.packing == "none",
                "data.packing",
                f"{self.data.packing} is not available under {method} (TRL's DPOTrainer pads every batch)",
                "set data.packing=none",
            ),
        ):
            require(ok, key, problem, fix)


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore: the root and one node per group."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, node in (
        ("model", ModelConfig),
        ("lora", LoraConfig),
        ("data", DataConfig),
        ("trainer", TrainerConfig),
        ("tracking", TrackingConfig),
        ("method", MethodConfig),
    ):
        cs.store(group=group, name="schema", node=node)


def to_schema(cfg: DictConfig) -> Config:
    """Turn a composed config into validated dataclasses (runs every `__post_init__`)."""
    try:
        schema = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:  # e.g. a required value left MISSING
        raise ConfigError(f"{exc}".strip()) from exc
    if not isinstance(schema, Config):
        raise ConfigError(
            f"composed config is a {type(schema).__name__}, not Config: is config_schema listed?"
        )
    return schema


def to_plain_dict(section: Any) -> dict[str, Any]:
    """A schema object (or DictConfig) as plain, YAML/JSON-safe containers."""
    container = OmegaConf.to_container(OmegaConf.structured(section), resolve=True)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}
