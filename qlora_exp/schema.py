"""Typed schema of every config group, registered in Hydra's ConfigStore.

Hydra merges each group's YAML into these dataclasses, so an unknown key or a value of the
wrong type is rejected while composing. Cross-field rules live in `__post_init__`, which runs
when `to_schema` turns the composed config into objects: still before any data or model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qlora_exp.errors import ConfigError

# The config tree (conf/), beside the package in the source tree (installed editable by `make install`).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
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
    # Liger's Triton kernels for this architecture (RMSNorm, RoPE, GeGLU/SwiGLU, and a fused
    # linear + cross-entropy loss that never materialises the vocabulary-sized logits). CUDA only.
    use_liger_kernel: bool = False
    # peft's prepare_model_for_kbit_training casts every unquantized parameter (embeddings, norms)
    # to fp32, which puts the whole residual stream in fp32. false casts them back to the compute
    # dtype: less memory and fewer dtype conversions per layer (Liger's RMSNorm still sums in fp32).
    upcast_unquantized_params: bool = True
    # With upcast_unquantized_params=false: keep the residual stream (the embedding output, every
    # layer's sums and the outputs of the projections that write into it) in fp32 while the weights,
    # attention, the MLPs and the LM head's input stay in the compute dtype. LoRA's small early
    # updates survive the fp32 sums, as with the fp32 upcast, without fp32 embeddings, an fp32 LM
    # head, fp32 blocks or their memory. BENCHMARKS.md.
    fp32_residual: bool = False
    # Mixture-of-experts models (qlora_exp/moe/): the fused experts in 4 bits like every linear weight.
    # false keeps them unquantized, explicitly; a MoE layout that cannot be quantized is refused.
    quantize_experts: bool = True
    # The router's load-balancing loss, added to the loss by transformers (output_router_logits):
    # with the model's own coefficient, or router_aux_loss_coef when given.
    router_aux_loss: bool = False
    router_aux_loss_coef: float | None = None

    def __post_init__(self) -> None:
        _require(bool(self.name_or_path), "model.name_or_path", "is empty", "name a hub id or a local dir")
        _require(
            self.router_aux_loss_coef is None or self.router_aux_loss,
            "model.router_aux_loss_coef",
            "is set but model.router_aux_loss=false, so no load-balancing loss is added",
            "also set model.router_aux_loss=true, or drop the coefficient",
        )
        _require(
            self.router_aux_loss_coef is None or self.router_aux_loss_coef >= 0,
            "model.router_aux_loss_coef",
            f"must be >= 0, got {self.router_aux_loss_coef}",
            "use e.g. 0.001, or null for the model's own",
        )
        # peft's k-bit preparation casts every unquantized weight to fp32: unquantized experts would
        # take 4 bytes per parameter (~116 GB for Qwen3-30B-A3B).
        _require(
            self.quantize_experts or not self.upcast_unquantized_params,
            "model.quantize_experts",
            "false keeps the experts unquantized, and model.upcast_unquantized_params=true would cast "
            "them to fp32",
            "also set model.upcast_unquantized_params=false (experts in the compute dtype)",
        )
        _require_choice(self.attn_implementation, "model.attn_implementation", ATTN_IMPLEMENTATIONS)
        _require_choice(self.bnb_4bit_quant_type, "model.bnb_4bit_quant_type", ("nf4", "fp4"))
        _require_choice(self.bnb_4bit_compute_dtype, "model.bnb_4bit_compute_dtype", COMPUTE_DTYPES)
        if self.bnb_4bit_quant_storage is not None:
            _require_choice(
                self.bnb_4bit_quant_storage, "model.bnb_4bit_quant_storage", (*COMPUTE_DTYPES[1:], "uint8")
            )
            _require(
                self.bnb_4bit_quant_storage in ("uint8", self.bnb_4bit_compute_dtype),
                "model.bnb_4bit_quant_storage",
                f"{self.bnb_4bit_quant_storage} differs from model.bnb_4bit_compute_dtype="
                f"{self.bnb_4bit_compute_dtype}, so FSDP would see mixed dtypes",
                "set both to the same dtype (e.g. bfloat16), or leave quant storage unset without FSDP",
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
    # Whole modules trained and saved beside the adapter, e.g. [embed_tokens] (peft's modules_to_save);
    # a tied output head stays tied to the trained copy.
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(self.r > 0, "lora.r", f"must be positive, got {self.r}", "use e.g. lora.r=16")
        _require(
            self.alpha > 0, "lora.alpha", f"must be positive, got {self.alpha}", "use e.g. lora.alpha=32"
        )
        _require(
            0.0 <= self.dropout < 1.0,
            "lora.dropout",
            f"must be in [0, 1), got {self.dropout}",
            "use e.g. 0.05",
        )
        _require(bool(self.target_modules), "lora.target_modules", "is empty", "use [all-linear] or names")
        # Presets (qlora_exp/moe/lora.py): all-linear (= all), attention, experts, joined with `+`.
        for everything in {"all", "all-linear"} & set(self.target_modules):
            _require(
                len(self.target_modules) == 1,
                "lora.target_modules",
                f"{everything} already targets every linear layer and the fused experts, "
                f"so {list(self.target_modules)} lists more than it",
                "use [all-linear] alone, or name what to target, e.g. [attention+experts]",
            )
        _require_choice(self.bias, "lora.bias", ("none", "all", "lora_only"))

    @property
    def scale(self) -> float:
        """The factor LoRA's update is multiplied by: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)


DATA_SOURCES = ("synthetic", "local", "hub")
DATA_FORMATS = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text", "preference")
# What method=dpo reads: chosen/rejected answers after a prompt given the way each of these formats
# gives one (qlora_exp/data/preference.py); `preference` is TRL's prompt/chosen/rejected.
PREFERENCE_FORMATS = ("auto", "alpaca", "messages", "sharegpt", "preference")
CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class DataColumnsConfig:
    """Names of the columns (and message keys) in the user's data, where they differ from the format's own."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    system: str = "system"
    history: str = "history"
    messages: str = "messages"
    conversations: str = "conversations"
    prompt: str = "prompt"
    completion: str = "completion"
    text: str = "text"
    role: str = "role"  # a message's role key; ShareGPT's `from` is read when this key is absent
    content: str = "content"  # a message's text key; ShareGPT's `value` is read when this key is absent
    loss_weight: str = "loss_weight"  # a message's 0/1 key: 0 leaves that turn untrained
    chosen: str = "chosen"  # preference data (method=dpo): the preferred answer
    rejected: str = "rejected"  # preference data (method=dpo): the dispreferred answer


@dataclass
class DataConfig:
    """Where examples come from and how they become token sequences."""

    source: str = "synthetic"  # synthetic | local | hub
    path: str | None = None  # local file (.json .jsonl .csv .parquet) or a directory of them
    hub_id: str | None = None  # a hub dataset (datasets.load_dataset) when source=hub
    hub_config: str | None = None  # the hub dataset's configuration (subset) name, if it has several
    split: str = "train"
    revision: str | None = None
    format: str = "auto"  # auto | alpaca | messages | sharegpt | prompt_completion | text | preference
    columns: DataColumnsConfig = field(default_factory=DataColumnsConfig)
    # Roles beyond the known aliases, e.g. {observation: user, function_call: assistant};
    # on the command line: +data.role_map.observation=user
    role_map: dict[str, str] = field(default_factory=dict)
    synthetic_size: int = 2000
    synthetic_zh_fraction: float = 0.3
    sample_size: int | None = None  # draw this many rows (seeded) before splitting
    val_fraction: float = 0.1
    max_length: int = 512
    overlength: str = "drop"  # drop | truncate | error
    # A named template (chatml, gemma, llama3) or a literal Jinja template; null: the tokenizer's own,
    # and chatml when the tokenizer has none.
    chat_template: str | None = None
    train_on_prompt: bool = False
    packing: str = "none"  # none | padding_free | packed
    cache: bool = True  # reuse tokenized datasets across runs (keyed by a fingerprint)

    def __post_init__(self) -> None:
        _require_choice(self.source, "data.source", DATA_SOURCES)
        _require(
            self.source != "local" or bool(self.path),
            "data.path",
            "is required when data.source=local",
            "pass data.path=/path/to/data.jsonl (or a directory of .json/.jsonl/.csv/.parquet files)",
        )
        _require(
            self.source != "hub" or bool(self.hub_id),
            "data.hub_id",
            "is required when data.source=hub",
            "pass data.hub_id=OWNER/NAME (and data.split, data.revision as needed)",
        )
        # A setting the chosen source does not read would be ignored in silence (`data.path=x.jsonl`
        # alone used to train on the synthetic rows). Only None-defaulted keys can tell "set" apart.
        _require(
            self.path is None or self.source == "local",
            "data.path",
            f"is set but data.source={self.source} does not read it",
            f"pick the local source too: data=local data.path={self.path}",
        )
        for key, value in (
            ("hub_id", self.hub_id),
            ("hub_config", self.hub_config),
            ("revision", self.revision),
        ):
            _require(
                value is None or self.source == "hub",
                f"data.{key}",
                f"is set but data.source={self.source} does not read it",
                f"pick the hub source too: data=hub data.{key}={value}",
            )
        _require_choice(self.format, "data.format", DATA_FORMATS)
        for role, target in self.role_map.items():
            _require(
                target in CHAT_ROLES,
                f"data.role_map.{role}",
                f"maps to {target!r}",
                f"map it to one of {', '.join(CHAT_ROLES)}",
            )
        _require(self.synthetic_size > 1, "data.synthetic_size", "must be at least 2", "use e.g. 2000")
        _require(
            0.0 <= self.synthetic_zh_fraction <= 1.0,
            "data.synthetic_zh_fraction",
            "must be in [0, 1]",
            "use 0.3",
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
        _require_choice(self.overlength, "data.overlength", ("drop", "truncate", "error"))
        _require_choice(self.packing, "data.packing", ("none", "padding_free", "packed"))


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
        for key in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
        ):
            value = getattr(self, key)
            _require(value >= 1, f"trainer.{key}", f"must be >= 1, got {value}", "use 1 or more")
        _require(
            self.warmup_steps >= 0,
            "trainer.warmup_steps",
            "must be >= 0",
            "use a step count or a share like 0.03",
        )
        _require(self.logging_steps >= 1, "trainer.logging_steps", "must be >= 1", "use e.g. 10")
        _require_choice(self.precision, "trainer.precision", PRECISIONS)
        for key in ("save_steps", "save_total_limit", "nan_guard_patience"):
            value = getattr(self, key)
            _require(value >= 1, f"trainer.{key}", f"must be >= 1, got {value}", "use 1 or more")
        _require_choice(
            self.train_sampling_strategy,
            "trainer.train_sampling_strategy",
            ("random", "sequential", "group_by_length"),
        )
        _require(self.eval_steps >= 0, "trainer.eval_steps", f"must be >= 0, got {self.eval_steps}", "use 50")
        _require(
            self.early_stopping_patience is None or self.early_stopping_patience >= 1,
            "trainer.early_stopping_patience",
            f"must be >= 1 or null, got {self.early_stopping_patience}",
            "use e.g. 3, or null to train to the end",
        )
        for key, wanted in (
            ("early_stopping_patience", self.early_stopping_patience is not None),
            ("load_best_model_at_end", self.load_best_model_at_end),
        ):
            _require(
                not wanted or self.eval_steps > 0,
                f"trainer.{key}",
                "needs evaluations during training, but trainer.eval_steps=0",
                "set trainer.eval_steps to a step count, e.g. trainer.eval_steps=50",
            )


MAX_TAG_LENGTH = 64  # W&B's limit on a run tag


@dataclass
class TrackingConfig:
    """Experiment tracking; W&B offline by default so no account is needed."""

    backend: str = "wandb"  # wandb | none
    mode: str = "offline"  # offline | online | disabled
    project: str = "qlora-exp"
    entity: str | None = None
    group: str | None = None  # null: in a sweep, the sweep directory's name
    name: str | None = None  # null: in a sweep, the job's varying overrides; else the run directory's name
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    # Log adapter/ and tokenizer/ as a W&B artifact of type `model`, with the base model, LoRA
    # config, data fingerprint, git commit and eval metrics as metadata (qlora_exp/tracking.py).
    log_adapter: bool = True

    def __post_init__(self) -> None:
        _require_choice(self.backend, "tracking.backend", ("wandb", "none"))
        _require_choice(self.mode, "tracking.mode", ("offline", "online", "disabled"))
        _require(bool(self.project), "tracking.project", "is empty", "name a W&B project, e.g. qlora-exp")
        _require(bool(self.job_type), "tracking.job_type", "is empty", "use e.g. train")
        for key in ("group", "name"):
            value = getattr(self, key)
            _require(value is None or bool(value), f"tracking.{key}", "is empty", "leave it null (default)")
        # W&B rejects longer tags when the run syncs, long after training.
        long_tags = [tag for tag in self.tags if not 0 < len(tag) <= MAX_TAG_LENGTH]
        _require(
            not long_tags,
            "tracking.tags",
            f"tags must be 1-{MAX_TAG_LENGTH} characters: {long_tags}",
            "shorten them",
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
        _require_choice(self.name, "method.name", METHODS)
        if not self.preference:
            for key in ("beta", "loss_type", "init_from"):
                value = getattr(self, key)
                _require(
                    value is None,
                    f"method.{key}",
                    f"is set but method={self.name} does not read it",
                    f"pick a preference method too: method=dpo method.{key}={value}",
                )
            return
        self.beta = DPO_BETA if self.beta is None else self.beta
        self.loss_type = DPO_LOSS_TYPE if self.loss_type is None else self.loss_type
        _require(self.beta > 0, "method.beta", f"must be positive, got {self.beta}", "use e.g. 0.1")
        _require_choice(self.loss_type, "method.loss_type", DPO_LOSS_TYPES)
        _require(
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
        _require(self.num_samples >= 0, "eval.num_samples", f"must be >= 0, got {self.num_samples}", "use 16")
        _require(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1", "use e.g. 32")
        _require(self.batch_size >= 1, "eval.batch_size", "must be >= 1", "use e.g. 8")
        _require(self.temperature > 0, "eval.temperature", f"must be > 0, got {self.temperature}", "use 0.7")
        _require(0.0 < self.top_p <= 1.0, "eval.top_p", f"must be in (0, 1], got {self.top_p}", "use 0.9")
        _require(
            self.do_sample or (self.temperature == 1.0 and self.top_p == 1.0),
            "eval.temperature / eval.top_p",
            "only apply when sampling, but eval.do_sample=false (greedy)",
            "set eval.do_sample=true, or leave temperature and top_p at 1.0",
        )


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

    def __post_init__(self) -> None:
        _require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}", "use e.g. seed=42")
        _require(
            not self.eval.samples_every_eval or self.trainer.eval_steps > 0,
            "eval.samples_every_eval",
            "needs evaluations during training, but trainer.eval_steps=0",
            "set trainer.eval_steps, e.g. trainer.eval_steps=50",
        )
        if self.method.preference:
            self._check_preference_data()
        else:
            _require(
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
            _require(ok, key, problem, fix)


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
