"""Who a run is: its directory and, inside a sweep, the sweep and the job's overrides.

`qlora-train`'s Hydra entry point builds one from Hydra's runtime config (the only place that reads
it); tests, notebooks and other launchers build one directly and call the run in-process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunContext:
    """A run's directory, and for a sweep job its sweep directory and command-line overrides."""

    path: Path
    sweep_dir: Path | None = None  # set for a job of a sweep (Hydra multirun)
    job_overrides: tuple[str, ...] = ()

    @property
    def in_sweep(self) -> bool:
        """True for a job of a sweep: failures are contained and finished jobs are skipped."""
        return self.sweep_dir is not None

    def tracking_group_and_name(self) -> tuple[str | None, str]:
        """Defaults for the W&B group and run name: in a sweep, the sweep directory's name and the
        job's overrides (e.g. `lora.r=16,trainer.learning_rate=2e-4`); else no group, the run
        directory's name."""
        if self.sweep_dir is None:
            return None, self.path.name
        overrides = [o for o in self.job_overrides if not o.startswith("experiment=")]
        return self.sweep_dir.name, ",".join(sorted(overrides)) or self.path.name
