"""Where the GPU idled during a profiled step, and what the host was doing meanwhile.

torch.profiler's op table sums kernel times; it cannot say when the GPU had nothing to run. This
reads the step's Chrome trace (`export_chrome_trace`): the union of the GPU's kernel, copy and
memset intervals gives its busy time, the holes between them its idle time, and each hole is
charged to the host op that was running when it began (the innermost op then open on any thread,
with its outermost parent on that thread). A hole under an op like `aten::item` means the host
waited for the GPU just before; a hole under none means Python between ops.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATEGORIES = ("cpu_op", "user_annotation", "python_function", "cuda_runtime", "cuda_driver")
NO_OP = "(no op: Python between ops)"


@dataclass(frozen=True)
class Span:
    """One trace event: [start, end) in microseconds, on a thread (host) or stream (GPU)."""

    name: str
    start: float
    end: float
    lane: str


def read_spans(trace: Path) -> tuple[list[Span], list[Span]]:
    """The GPU's spans and the host's spans of a Chrome trace written by torch.profiler."""
    events = json.loads(trace.read_text(encoding="utf-8"))
    events = events["traceEvents"] if isinstance(events, dict) else events
    gpu, host = [], []
    for event in events:
        if event.get("ph") != "X" or "dur" not in event:
            continue
        span = Span(
            str(event.get("name", "")),
            float(event["ts"]),
            float(event["ts"]) + float(event["dur"]),
            f"{event.get('pid')}/{event.get('tid')}",
        )
        category = event.get("cat", "")
        if category in GPU_CATEGORIES:
            gpu.append(span)
        elif category in HOST_CATEGORIES:
            host.append(span)
    return gpu, host


def idle_intervals(gpu: list[Span]) -> tuple[float, float, list[tuple[float, float]]]:
    """(busy µs, first-to-last µs, idle holes) of the GPU spans, all streams merged."""
    busy, holes = 0.0, []
    spans = sorted(gpu, key=lambda s: s.start)
    if not spans:
        return 0.0, 0.0, []
    start, end = spans[0].start, spans[0].end
    for span in spans[1:]:
        if span.start > end:
            busy += end - start
            holes.append((end, span.start))
            start = span.start
        end = max(end, span.end)
    busy += end - start
    return busy, end - spans[0].start, holes


def host_ops_at(host: list[Span], times: list[float]) -> list[str]:
    """For each time (ascending): 'outermost > innermost' host op open then, taking the innermost
    that began last over all threads. One sweep over the host spans, a stack per thread (a thread's
    ops nest)."""
    spans = sorted(host, key=lambda s: s.start)
    stacks: dict[str, list[Span]] = defaultdict(list)
    causes, i = [], 0
    for t in times:
        while i < len(spans) and spans[i].start <= t:
            span = spans[i]
            stack = stacks[span.lane]
            while stack and stack[-1].end <= span.start:
                stack.pop()
            stack.append(span)
            i += 1
        best: tuple[float, str, str] | None = None
        for stack in stacks.values():
            open_spans = [s for s in stack if s.end > t]
            if open_spans and (best is None or open_spans[-1].start > best[0]):
                best = (open_spans[-1].start, open_spans[0].name, open_spans[-1].name)
        if best is None:
            causes.append(NO_OP)
        else:
            causes.append(best[2] if best[1] == best[2] else f"{best[1]} > {best[2]}")
    return causes


def idle_report(trace: Path, min_hole_us: float = 20.0, rows: int = 25) -> str:
    """Busy and idle time of the GPU in `trace`, the idle time by the host op it began under."""
    gpu, host = read_spans(trace)
    busy, window, holes = idle_intervals(gpu)
    if not window:
        return "GPU timeline: no GPU activity in the trace (CPU run)"
    charged: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    small = sum(end - start for start, end in holes if end - start < min_hole_us)
    large = [(start, end) for start, end in holes if end - start >= min_hole_us]
    for (start, end), cause in zip(large, host_ops_at(host, [start for start, _ in large]), strict=True):
        charged[cause] += end - start
        counts[cause] += 1
    idle = window - busy
    lines = [
        f"GPU timeline: {window / 1e3:.1f} ms from first to last GPU work, busy {busy / 1e3:.1f} ms, "
        f"idle {idle / 1e3:.1f} ms ({100 * idle / window:.1f}%) in {len(holes)} holes; holes under "
        f"{min_hole_us:g} µs: {small / 1e3:.1f} ms in all",
        "idle ms | holes | host op open when the hole began (outermost > innermost)",
    ]
    for cause, micros in sorted(charged.items(), key=lambda item: -item[1])[:rows]:
        lines.append(f"{micros / 1e3:7.1f} | {counts[cause]:5d} | {cause[:150]}")
    return "\n".join(lines)
