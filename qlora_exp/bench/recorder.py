"""Per-step timing, taken from inside the Trainer so the bench times what training runs.

The steps are marked on the device's own timeline (CUDA events), never by synchronising: a sync at
each step would make the host wait for the GPU to finish before it queues the next step, and time an
idle gap that training does not have. The marks are read once, when training ends.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from qlora_exp.bench.timeline import idle_report

log = logging.getLogger(__name__)


class StepRecorder(TrainerCallback):
    """Seconds of each optimizer step, from the end of the previous one (data loading included) to
    its own end, on the GPU's timeline (wall time without a GPU).

    When `profile_step` is set, that step runs under torch.profiler; its table, its trace
    (gzipped Chrome trace) and where the GPU idled (bench.timeline) are written after training.
    The caller leaves that step out of the timing.
    """

    def __init__(self, profile_step: int | None = None, profile_path: Path | None = None) -> None:
        self.profile_step = profile_step
        self.profile_path = profile_path
        self._profiler: torch.profiler.profile | None = None
        self._marks: list[torch.cuda.Event | float] = []

    @staticmethod
    def _mark() -> torch.cuda.Event | float:
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @property
    def seconds(self) -> list[float]:
        """Each step's seconds; reading them waits for the GPU to finish what was queued."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return [
            start.elapsed_time(end) / 1e3 if isinstance(start, torch.cuda.Event) else end - start  # type: ignore[arg-type,operator]
            for start, end in itertools.pairwise(self._marks)
        ]

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._marks = [self._mark()]

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.profile_step and self._profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._marks.append(self._mark())
        if self._profiler is not None:
            self._profiler.stop()  # waits for the GPU: this step is not timed

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._profiler is not None and self.profile_path is not None:
            self.write_profile(self._profiler, self.profile_path)
            self._profiler = None

    @staticmethod
    def write_profile(profiler: torch.profiler.profile, path: Path) -> None:
        """The step's op table, its idle-time report (profile_NAME.txt) and its trace (.trace.json.gz)."""
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70)
        trace = path.with_suffix(".trace.json")
        profiler.export_chrome_trace(str(trace))
        report = idle_report(trace)
        path.write_text(f"{report}\n\n{table}", encoding="utf-8")
        with trace.open("rb") as raw, gzip.open(f"{trace}.gz", "wb") as packed:
            shutil.copyfileobj(raw, packed)
        trace.unlink()
        log.info("profile written to %s (trace %s.gz)", path, trace)
