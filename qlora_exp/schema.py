"""Typed schema of every config group, registered in Hydra's ConfigStore.

Hydra merges each group's YAML into these dataclasses, so an unknown key or a value of the
wrong type is rejected while composing. Cross-field rules live in `__post_init__`, which runs
when `to_schema` turns the composed config into objects: still before any data or model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qlora_exp.errors import ConfigError

COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")


def _require(condition: bool, key: str, problem: str, fix: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {problem}. Fix: {fix}")


def _require_choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"got {value!r}", f"use one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    """Which base model to load and how to quantize it."""

    # The one place a model's name lives. `embedded:tiny-gemma2` is built locally (no hub).
    name_or_path: str = MISSING
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str = "eager"
    load_in_4bit: bool = True
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "auto"
    # FSDP shards 4-bit weights only when they are stored in the compute dtype.
    bnb_4bit_quant_storage: str | None = None
    gradient_checkpointing: bool = True

    def __post_init__(self) -> None:
        _require(bool(self.name_or_path), "model.name_or_path", "is empty", "name a hub id or a local dir")
        _require_choice(self.attn_implementation, "model.attn_implementation", ATTN_IMPLEMENTATIONS)
        _require_choice(self.bnb_4bit_quant_type, "model.bnb_4bit_quant_type", ("nf4", "fp4"))
        _require_choice(self.bnb_4bit_compute_dtype, "model.bnb_4bit_compute_dtype", COMPUTE_DTYPES)
        if self.bnb_4bit_quant_storage is not None:
            _require_choice(
                self.bnb_4bit_quant_storage, "model.bnb_4bit_quant_storage", COMPUTE_DTYPES[1:] + ("uint8",)
            )


@dataclass
class LoraConfig:
    """LoRA adapter shape (peft)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # ["all-linear"] targets every linear layer except the output head (peft's shorthand).
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    bias: str = "none"
    use_rslora: bool = False

    def __post_init__(self) -> None:
        _require(self.r > 0, "lora.r", f"must be positive, got {self.r}", "use e.g. lora.r=16")
        _require(self.alpha > 0, "lora.alpha", f"must be positive, got {self.alpha}", "use e.g. lora.alpha=32")
        _require(
            0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}", "use e.g. 0.05"
        )
        _require(bool(self.target_modules), "lora.target_modules", "is empty", "use [all-linear] or names")
        _require_choice(self.bias, "lora.bias", ("none", "all", "lora_only"))

    @property
    def scale(self) -> float:
        """The factor LoRA's update is multiplied by: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)


@dataclass
class DataConfig:
    """Where examples come from and how they become token sequences."""

    source: str = "synthetic"  # synthetic | local
    path: str | None = None  # local alpaca JSON / JSONL file when source=local
    synthetic_size: int = 2000
    synthetic_zh_fraction: float = 0.3
    sample_size: int | None = None  # draw this many rows (seeded) before splitting
    val_fraction: float = 0.1
    max_length: int = 512
    chat_template: str | None = None  # Jinja template overriding the tokenizer's own
    train_on_prompt: bool = False

    def __post_init__(self) -> None:
        _require_choice(self.source, "data.source", ("synthetic", "local"))
        _require(
            self.source != "local" or bool(self.path),
            "data.path",
            "is required when data.source=local",
            "pass data.path=/path/to/data.jsonl",
        )
        _require(self.synthetic_size > 1, "data.synthetic_size", "must be at least 2", "use e.g. 2000")
        _require(
            0.0 <= self.synthetic_zh_fraction <= 1.0, "data.synthetic_zh_fraction", "must be in [0, 1]", "use 0.3"
        )
        _require(
            self.sample_size is None or self.sample_size > 1,
            "data.sample_size",
            f"must be at least 2 (or null for all rows), got {self.sample_size}",
            "use e.g. data.sample_size=2000",
        )
        _require(
            0.0 < self.val_fraction < 1.0,
            "data.val_fraction",
            f"must be in (0, 1), got {self.val_fraction}",
            "use e.g. 0.1",
        )
        _require(self.max_length >= 16, "data.max_length", f"too small ({self.max_length})", "use e.g. 512")


@dataclass
class TrainerConfig:
    """The subset of transformers' TrainingArguments a user sets; the rest is derived."""

    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.03  # an int counts steps; a float in [0, 1) is a share of all steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    precision: str = "auto"  # auto: bf16 on a GPU that has it, fp32 on the CPU
    logging_steps: int = 10
    train_sampling_strategy: str = "random"  # random | sequential | group_by_length
    dataloader_num_workers: int = 0

    def __post_init__(self) -> None:
        _require(
            self.learning_rate > 0,
            "trainer.learning_rate",
            f"must be positive, got {self.learning_rate}",
            "use e.g. 2e-4",
        )
        _require(
            self.max_steps > 0 or self.num_train_epochs > 0,
            "trainer.max_steps / trainer.num_train_epochs",
            "no training would happen",
            "set trainer.max_steps > 0 or trainer.num_train_epochs > 0",
        )
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, key)
            _require(value >= 1, f"trainer.{key}", f"must be >= 1, got {value}", "use 1 or more")
        _require(
            self.warmup_steps >= 0, "trainer.warmup_steps", "must be >= 0", "use a step count or a share like 0.03"
        )
        _require(self.logging_steps >= 1, "trainer.logging_steps", "must be >= 1", "use e.g. 10")
        _require_choice(self.precision, "trainer.precision", PRECISIONS)
        _require_choice(
            self.train_sampling_strategy, "trainer.train_sampling_strategy", ("random", "sequential", "group_by_length")
        )


@dataclass
class TrackingConfig:
    """Experiment tracking; W&B offline by default so no account is needed."""

    backend: str = "wandb"  # wandb | none
    mode: str = "offline"  # offline | online | disabled
    project: str = "qlora-exp"
    entity: str | None = None
    group: str | None = None  # null: in a sweep, the sweep directory's name
    name: str | None = None  # null: in a sweep, the job's overrides; else the run directory's name
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require_choice(self.backend, "tracking.backend", ("wandb", "none"))
        _require_choice(self.mode, "tracking.mode", ("offline", "online", "disabled"))
        _require(bool(self.project), "tracking.project", "is empty", "name a W&B project, e.g. qlora-exp")
        _require(bool(self.job_type), "tracking.job_type", "is empty", "use e.g. train")
        for key in ("group", "name"):
            value = getattr(self, key)
            _require(value is None or bool(value), f"tracking.{key}", "is empty", "leave it null (default)")
        # W&B rejects tags longer than 64 characters when the run syncs, long after training.
        long_tags = [tag for tag in self.tags if not 0 < len(tag) <= 64]
        _require(not long_tags, "tracking.tags", f"tags must be 1-64 characters: {long_tags}", "shorten them")


@dataclass
class Config:
    """The whole experiment: one section per config group, plus the seed."""

    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        _require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}", "use e.g. seed=42")


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
    ):
        cs.store(group=group, name="schema", node=node)


def to_schema(cfg: DictConfig) -> Config:
    """Turn a composed config into validated dataclasses (runs every `__post_init__`)."""
    try:
        schema = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:  # e.g. a required value left MISSING
        raise ConfigError(f"{exc}".strip()) from exc
    if not isinstance(schema, Config):
        raise ConfigError(f"composed config is a {type(schema).__name__}, not Config: is config_schema listed?")
    return schema


def to_plain_dict(section: Any) -> dict[str, Any]:
    """A schema object (or DictConfig) as plain, YAML/JSON-safe containers."""
    container = OmegaConf.to_container(OmegaConf.structured(section), resolve=True)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}
