"""How a run trains and evaluates: the Trainer (`trainer`), the method (`method`: sft, dpo) and the
held-out generations (`eval`)."""

from __future__ import annotations

from dataclasses import dataclass

from qlora_exp.schema.checks import require, require_choice

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class TrainerConfig:
    """The subset of transformers' TrainingArguments a user sets; the rest is derived."""

    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    # Sized for the default run: the embedded tiny model on CPU, where 2e-3 was chosen
    # (docs/evaluation.md). 7-9B models want QLoRA's 2e-4, which their experiments set
    # (experiments/gemma2_9b_gpu.yaml, prototype_gemma2_9b.yaml) as does `qlora-bench --learning-rate`.
    learning_rate: float = 2e-3
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.03  # an int counts steps; a float in [0, 1) is a share of all steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    precision: str = "auto"  # auto: bf16 on a GPU that has it, fp32 on the CPU
    logging_steps: int = 10
    train_sampling_strategy: str = "random"  # random | sequential | group_by_length
    dataloader_num_workers: int = 0
    # Evaluation during training (Trainer's own schedule, EarlyStoppingCallback, best-model reload).
    eval_steps: int = 50  # evaluate every N optimizer steps; 0: only before and after training
    early_stopping_patience: int | None = None  # stop after N evaluations without a lower eval_loss
    load_best_model_at_end: bool = False  # end with the adapter of the evaluation with the lowest eval_loss
    # Reliability (qlora_exp/checkpoint.py, qlora_exp/guards.py).
    save_steps: int = 100  # an atomic, resumable checkpoint every this many optimizer steps
    save_total_limit: int = 2  # keep this many newest complete checkpoints
    nan_guard_patience: int = 1  # stop after this many consecutive steps with non-finite gradients
    auto_find_batch_size: bool = False  # on CUDA OOM, halve the batch and retry (accelerate)

    def __post_init__(self) -> None:
        require(
            self.learning_rate > 0,
            "trainer.learning_rate",
            f"must be positive, got {self.learning_rate}",
            "use e.g. 2e-4",
        )
        require(
            self.max_steps > 0 or self.num_train_epochs > 0,
            "trainer.max_steps / trainer.num_train_epochs",
            "no training would happen",
            "set trainer.max_steps > 0 or trainer.num_train_epochs > 0",
        )
        for key in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
        ):
            value = getattr(self, key)
            require(value >= 1, f"trainer.{key}", f"must be >= 1, got {value}", "use 1 or more")
        require(
            self.warmup_steps >= 0,
            "trainer.warmup_steps",
            "must be >= 0",
            "use a step count or a share like 0.03",
        )
        require(self.logging_steps >= 1, "trainer.logging_steps", "must be >= 1", "use e.g. 10")
        require_choice(self.precision, "trainer.precision", PRECISIONS)
        for key in ("save_steps", "save_total_limit", "nan_guard_patience"):
            value = getattr(self, key)
            require(value >= 1, f"trainer.{key}", f"must be >= 1, got {value}", "use 1 or more")
        require_choice(
            self.train_sampling_strategy,
            "trainer.train_sampling_strategy",
            ("random", "sequential", "group_by_length"),
        )
        require(self.eval_steps >= 0, "trainer.eval_steps", f"must be >= 0, got {self.eval_steps}", "use 50")
        require(
            self.early_stopping_patience is None or self.early_stopping_patience >= 1,
            "trainer.early_stopping_patience",
            f"must be >= 1 or null, got {self.early_stopping_patience}",
            "use e.g. 3, or null to train to the end",
        )
        for key, wanted in (
            ("early_stopping_patience", self.early_stopping_patience is not None),
            ("load_best_model_at_end", self.load_best_model_at_end),
        ):
            require(
                not wanted or self.eval_steps > 0,
                f"trainer.{key}",
                "needs evaluations during training, but trainer.eval_steps=0",
                "set trainer.eval_steps to a step count, e.g. trainer.eval_steps=50",
            )


METHODS = ("sft", "dpo")
# TRL DPOTrainer's loss types that take no setting besides beta (exo_pair and robust also need label
# smoothing; `sft` alone is not a preference loss).
DPO_LOSS_TYPES = (
    "sigmoid",
    "ipo",
    "hinge",
    "sigmoid_norm",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
)
DPO_BETA, DPO_LOSS_TYPE = 0.1, "sigmoid"  # what null means under dpo: TRL's defaults, the DPO paper's loss


@dataclass
class MethodConfig:
    """How the adapter is trained: `sft` (supervised, on answers) or `dpo` (TRL's DPOTrainer, on
    chosen/rejected pairs; qlora_exp/preference.py).

    Keys that only DPO reads default to null, so that one set under sft is refused rather than
    ignored; under dpo a null takes the default named in its comment (`__post_init__` fills it in).
    """

    name: str = "sft"  # sft | dpo
    beta: float | None = None  # dpo, null: DPO_BETA. Higher keeps the policy closer to the reference
    loss_type: str | None = None  # dpo, null: DPO_LOSS_TYPE; one of DPO_LOSS_TYPES
    # dpo: a finished run directory whose adapter DPO continues (trainable) and keeps, frozen, as the
    # reference; null: a fresh adapter, whose reference is the base model (the adapter disabled).
    init_from: str | None = None

    def __post_init__(self) -> None:
        require_choice(self.name, "method.name", METHODS)
        if not self.preference:
            for key in ("beta", "loss_type", "init_from"):
                value = getattr(self, key)
                require(
                    value is None,
                    f"method.{key}",
                    f"is set but method={self.name} does not read it",
                    f"pick a preference method too: method=dpo method.{key}={value}",
                )
            return
        self.beta = DPO_BETA if self.beta is None else self.beta
        self.loss_type = DPO_LOSS_TYPE if self.loss_type is None else self.loss_type
        require(self.beta > 0, "method.beta", f"must be positive, got {self.beta}", "use e.g. 0.1")
        require_choice(self.loss_type, "method.loss_type", DPO_LOSS_TYPES)
        require(
            self.init_from is None or bool(self.init_from),
            "method.init_from",
            "is empty",
            "name a finished run directory, or leave it null",
        )

    @property
    def preference(self) -> bool:
        """True for methods trained on chosen/rejected pairs."""
        return self.name == "dpo"


@dataclass
class EvalConfig:
    """Generations on held-out prompts: shown as samples, scored by exact match against the reference."""

    num_samples: int = 16  # a fixed, seeded subset of the validation conversations; 0 turns samples off
    max_new_tokens: int = 32
    batch_size: int = 8
    do_sample: bool = False  # greedy by default, so exact match is deterministic
    temperature: float = 1.0
    top_p: float = 1.0
    samples_every_eval: bool = False  # also generate (and log a W&B table) at every trainer.eval_steps

    def __post_init__(self) -> None:
        require(self.num_samples >= 0, "eval.num_samples", f"must be >= 0, got {self.num_samples}", "use 16")
        require(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1", "use e.g. 32")
        require(self.batch_size >= 1, "eval.batch_size", "must be >= 1", "use e.g. 8")
        require(self.temperature > 0, "eval.temperature", f"must be > 0, got {self.temperature}", "use 0.7")
        require(0.0 < self.top_p <= 1.0, "eval.top_p", f"must be in (0, 1], got {self.top_p}", "use 0.9")
        require(
            self.do_sample or (self.temperature == 1.0 and self.top_p == 1.0),
            "eval.temperature / eval.top_p",
            "only apply when sampling, but eval.do_sample=false (greedy)",
            "set eval.do_sample=true, or leave temperature and top_p at 1.0",
        )
