"""Who a run is: its directory and, inside a sweep, the sweep and the job's overrides.

`qlora-train`'s Hydra entry point builds one from Hydra's runtime config (the only place that reads
it); tests, notebooks and other launchers build one directly and call the run in-process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_exp.schema import MAX_TAG_LENGTH


@dataclass(frozen=True)
class RunContext:
    """A run's directory, and for a sweep job its sweep directory and command-line overrides:
    those of the keys that vary within the sweep (they name the job) and those every job shares."""

    path: Path
    sweep_dir: Path | None = None  # set for a job of a sweep (Hydra multirun)
    job_overrides: tuple[str, ...] = ()  # e.g. ("lora.r=16", "trainer.learning_rate=2e-4")
    shared_overrides: tuple[str, ...] = ()  # e.g. ("data=local", "data.path=/data/x.json")

    @property
    def in_sweep(self) -> bool:
        """True for a job of a sweep: failures are contained and finished jobs are skipped."""
        return self.sweep_dir is not None

    def tracking_group_and_name(self) -> tuple[str | None, str]:
        """Defaults for the W&B group and run name: in a sweep, the sweep's group and the job's
        varying overrides (e.g. `lora.r=16,trainer.learning_rate=2e-4`, as its directory is named);
        else no group, the run directory's name."""
        if self.sweep_dir is None:
            return None, self.path.name
        return sweep_group(self.sweep_dir), ",".join(sorted(self.job_overrides)) or self.path.name

    def tracking_config(self) -> dict[str, Any]:
        """What a sweep job adds to its W&B config: the sweep's directory and shared overrides, so the
        group's runs carry what they have in common (empty for a single run)."""
        if self.sweep_dir is None:
            return {}
        return {"sweep": {"dir": str(self.sweep_dir), "shared_overrides": list(self.shared_overrides)}}

    def tracking_tags(self) -> list[str]:
        """The shared overrides as W&B tags (`override_tags`)."""
        return override_tags(self.shared_overrides)


def sweep_group(sweep_dir: Path) -> str:
    """The default W&B group of a sweep's runs (jobs and comparison run): its directory's name."""
    return sweep_dir.resolve().name


def override_tags(overrides: tuple[str, ...] | list[str]) -> list[str]:
    """Overrides as W&B tags, for filtering in the W&B UI; one longer than W&B's tag limit is left
    out (the run's config keeps it under `sweep.shared_overrides`)."""
    return [o for o in overrides if len(o) <= MAX_TAG_LENGTH]
