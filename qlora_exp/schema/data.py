"""Where examples come from and how they become token sequences (`data`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora_exp.schema.checks import require, require_choice

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
        require_choice(self.source, "data.source", DATA_SOURCES)
        require(
            self.source != "local" or bool(self.path),
            "data.path",
            "is required when data.source=local",
            "pass data.path=/path/to/data.jsonl (or a directory of .json/.jsonl/.csv/.parquet files)",
        )
        require(
            self.source != "hub" or bool(self.hub_id),
            "data.hub_id",
            "is required when data.source=hub",
            "pass data.hub_id=OWNER/NAME (and data.split, data.revision as needed)",
        )
        # A setting the chosen source does not read would be ignored in silence (`data.path=x.jsonl`
        # alone used to train on the synthetic rows). Only None-defaulted keys can tell "set" apart.
        require(
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
            require(
                value is None or self.source == "hub",
                f"data.{key}",
                f"is set but data.source={self.source} does not read it",
                f"pick the hub source too: data=hub data.{key}={value}",
            )
        require_choice(self.format, "data.format", DATA_FORMATS)
        for role, target in self.role_map.items():
            require(
                target in CHAT_ROLES,
                f"data.role_map.{role}",
                f"maps to {target!r}",
                f"map it to one of {', '.join(CHAT_ROLES)}",
            )
        require(self.synthetic_size > 1, "data.synthetic_size", "must be at least 2", "use e.g. 2000")
        require(
            0.0 <= self.synthetic_zh_fraction <= 1.0,
            "data.synthetic_zh_fraction",
            "must be in [0, 1]",
            "use 0.3",
        )
        require(
            self.sample_size is None or self.sample_size > 1,
            "data.sample_size",
            f"must be at least 2 (or null for all rows), got {self.sample_size}",
            "use e.g. data.sample_size=2000",
        )
        require(
            0.0 < self.val_fraction < 1.0,
            "data.val_fraction",
            f"must be in (0, 1), got {self.val_fraction}",
            "use e.g. 0.1",
        )
        require(self.max_length >= 16, "data.max_length", f"too small ({self.max_length})", "use e.g. 512")
        require_choice(self.overlength, "data.overlength", ("drop", "truncate", "error"))
        require_choice(self.packing, "data.packing", ("none", "padding_free", "packed"))
