"""Per-step timing and losses, taken from inside the Trainer so the bench times what training runs."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)


class StepRecorder(TrainerCallback):
    """Seconds of each optimizer step (device-synchronised) and each step's logged loss.

    A step lasts from the end of the previous one (data loading included) to its own end. When
    `profile_step` is set, that step runs under torch.profiler and its table is written afterwards;
    the caller leaves that step out of the timing, and the table's writing is timed by no step.
    """

    def __init__(self, profile_step: int | None = None, profile_path: Path | None = None) -> None:
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self.profile_step = profile_step
        self.profile_path = profile_path
        self._profiler: torch.profiler.profile | None = None
        self._last = 0.0

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last = self._now()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.profile_step and self._profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = self._now()
        self.seconds.append(now - self._last)
        if self._profiler is not None and self.profile_path is not None:
            self._profiler.stop()
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            table = self._profiler.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70)
            self.profile_path.write_text(table, encoding="utf-8")
            log.info("profile of step %d written to %s", state.global_step, self.profile_path)
            self._profiler = None
            now = self._now()
        self._last = now

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
