"""Experiment tracking (`tracking`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora_exp.schema.checks import require, require_choice

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
        require_choice(self.backend, "tracking.backend", ("wandb", "none"))
        require_choice(self.mode, "tracking.mode", ("offline", "online", "disabled"))
        require(bool(self.project), "tracking.project", "is empty", "name a W&B project, e.g. qlora-exp")
        require(bool(self.job_type), "tracking.job_type", "is empty", "use e.g. train")
        for key in ("group", "name"):
            value = getattr(self, key)
            require(value is None or bool(value), f"tracking.{key}", "is empty", "leave it null (default)")
        # W&B rejects longer tags when the run syncs, long after training.
        long_tags = [tag for tag in self.tags if not 0 < len(tag) <= MAX_TAG_LENGTH]
        require(
            not long_tags,
            "tracking.tags",
            f"tags must be 1-{MAX_TAG_LENGTH} characters: {long_tags}",
            "shorten them",
        )
