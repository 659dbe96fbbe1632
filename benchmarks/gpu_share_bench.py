"""Several training processes on one GPU: qlora-bench's `defaults` setting in K processes at once.

What `hydra/launcher=gpu_share` buys (issue 18, item 3): for K = 1..--max-k, K processes train the
same setting on the same examples side by side; each one's real tokens/s, their sum (the aggregate),
the aggregate's ratio to K = 1, and whether every process logged exactly the per-step losses of the
process alone (K = 1).

To fit one 10-minute command, each process loads the model once: --max-k worker processes start
together, and worker i (from 0) runs the setting once in every phase K > i, through the bench's own
functions (qlora_exp.bench: data, LoRA, trainer, step recorder). A phase starts when the previous
one has written its results, and its K workers meet at a file barrier (OUT/barrier/kK) after their
warm-up steps, so their timed steps run side by side; the workers not in a phase hold their weights
and run nothing. Worker 0 compiles first, into the
compile cache (qlora_exp/cache.py) the others then load from.

Writes OUT/kK/workerI.json (the bench's SettingResult) as each run ends, OUT/workerI.log, and
OUT/gpu_share.json with the table it prints. Other arguments go to qlora-bench (--model, --data,
--examples-per-step, --timed-steps, ...).

    python benchmarks/gpu_share_bench.py --out DIR                        # GPU: gemma2_9b, K = 1..4
    python benchmarks/gpu_share_bench.py --out DIR --max-k 2 --examples-per-step 2   # CPU: tiny model
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from qlora_exp.bench import measure
from qlora_exp.bench.data import run_dataset
from qlora_exp.bench.measure import Shared, load_shared_base, plan_steps, run_setting
from qlora_exp.bench.options import BENCH_MODELS, BenchOptions, parse_options
from qlora_exp.bench.run import compose_model_section
from qlora_exp.bench.settings import Setting, select_settings
from qlora_exp.embedded import is_embedded, resolve_embedded
from qlora_exp.model import load_tokenizer

log = logging.getLogger("gpu_share_bench")

WAIT_TIMEOUT_S = 300.0  # longer than a cold compile plus a phase's steps; a worker that died never comes


def wait_for(directory: Path, count: int, what: str) -> None:
    """Until `directory` holds `count` files."""
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not directory.is_dir() or len(list(directory.iterdir())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{directory}: {what} never came")
        time.sleep(0.05)


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON results and logs")
    parser.add_argument("--max-k", type=int, default=4, help="largest number of processes at once")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # set for the workers
    return parser.parse_known_args()


class TimedStepsTogether(TrainerCallback):
    """Waits after the warm-up steps until the phase's other processes got there too.

    Put before the bench's StepRecorder: it waits at the end of the last warm-up step, before the
    recorder notes that step's end, so the wait falls in an untimed step.
    """

    def __init__(self, directory: Path, parties: int, warmup_steps: int) -> None:
        self.directory = directory
        self.parties = parties
        self.warmup_steps = warmup_steps

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step != self.warmup_steps:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / str(os.getpid())).touch()
        wait_for(self.directory, self.parties, "the phase's other processes")


@contextmanager
def timed_steps_together(directory: Path, parties: int, warmup_steps: int) -> Iterator[None]:
    """Every trainer the bench builds meanwhile gets a `TimedStepsTogether` before its recorder."""
    build = measure.build_trainer

    def build_with_barrier(*args: Any, **kwargs: Any) -> Any:
        trainer, recorder = build(*args, **kwargs)
        trainer.callback_handler.callbacks.insert(0, TimedStepsTogether(directory, parties, warmup_steps))
        return trainer, recorder

    measure.build_trainer = build_with_barrier
    try:
        yield
    finally:
        measure.build_trainer = build


def bench_options(out: Path, bench_args: list[str]) -> BenchOptions:
    return parse_options([*bench_args, "--settings", "defaults", "--out", str(out)])


def worker(index: int, max_k: int, out: Path, bench_args: list[str]) -> None:
    """Load once, then run the `defaults` setting in every phase K > index."""
    options = bench_options(out / f"worker{index}", bench_args)
    preset, name_or_path = BENCH_MODELS[options.model]
    model_cfg, lora_cfg = compose_model_section(preset, name_or_path)
    setting: Setting = select_settings(
        ("defaults",),
        (),
        model_cfg,
        examples_per_step=options.examples_per_step,
        max_length=options.max_length,
        optim=options.optim,
        lora_dropout=lora_cfg.dropout,
    )[0]
    out_dir = options.out or out
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model_cfg)
    dataset, _ = run_dataset(options, tokenizer, out_dir)
    base = load_shared_base(model_cfg, setting.attn_implementation)
    shared = Shared(base, tokenizer, dataset, lora_cfg, model_cfg.bnb_4bit_compute_dtype, options, out_dir)
    warmup = plan_steps(setting, options).warmup_steps
    for k in range(index + 1, max_k + 1):
        if k > 1:  # the previous phase is over: nothing but this phase runs on the GPU, warm-ups included
            wait_for(out / f"k{k - 1}", k - 1, f"the results of K={k - 1}")
        with timed_steps_together(out / "barrier" / f"k{k}", k, warmup):
            result = run_setting(setting, shared)
        (out / f"k{k}").mkdir(parents=True, exist_ok=True)
        (out / f"k{k}" / f"worker{index}.json").write_text(json.dumps(result.to_dict()) + "\n")
        log.info("K=%d: %s real tokens/s", k, result.real_tokens_per_s)


def summarise(out: Path, max_k: int) -> dict[str, Any]:
    """Per phase: each process's real tokens/s, the aggregate, the ratio to K=1, losses equal to K=1's."""
    phases: dict[str, Any] = {}
    alone: dict[str, Any] | None = None
    for k in range(1, max_k + 1):
        results = [json.loads(p.read_text()) for p in sorted((out / f"k{k}").glob("worker*.json"))]
        speeds = [r["real_tokens_per_s"] for r in results]
        complete = len(results) == k and all(s is not None for s in speeds)
        if k == 1 and complete:
            alone = results[0]
        aggregate = sum(speeds) if complete else None
        phases[f"K={k}"] = {
            "processes": len(results),
            "real_tokens_per_s": speeds,
            "aggregate_real_tokens_per_s": aggregate,
            "ratio_to_k1": aggregate / alone["real_tokens_per_s"] if aggregate and alone else None,
            "peak_memory_gb": [r["peak_memory_gb"] for r in results],
            "losses_equal_k1": all(r["step_losses"] == alone["step_losses"] for r in results)
            if alone and results
            else None,
            "errors": [r["error"] for r in results if r["error"]],
        }
    return phases


def table(phases: dict[str, Any]) -> str:
    rows = ["| K | real tokens/s per process | aggregate | vs K=1 | peak GiB per process | losses = K=1 |"]
    rows.append("|---|---|---|---|---|---|")
    for name, p in phases.items():
        speeds = ", ".join(f"{s:,.0f}" if s else "failed" for s in p["real_tokens_per_s"]) or "none"
        aggregate = f"{p['aggregate_real_tokens_per_s']:,.0f}" if p["aggregate_real_tokens_per_s"] else "n/a"
        ratio = f"{p['ratio_to_k1']:.2f}x" if p["ratio_to_k1"] else "n/a"
        peaks = ", ".join(f"{m:.1f}" for m in p["peak_memory_gb"] if m is not None)
        rows.append(f"| {name[2:]} | {speeds} | {aggregate} | {ratio} | {peaks} | {p['losses_equal_k1']} |")
    return "\n".join(rows)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, bench_args = parse_args()
    if args.worker is not None:
        worker(args.worker, args.max_k, args.out, bench_args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    options = bench_options(args.out, bench_args)  # refuses bad bench arguments before anything starts
    name_or_path = BENCH_MODELS[options.model][1]
    if is_embedded(name_or_path):
        resolve_embedded(name_or_path)  # built once here, not by every worker at once
    started = time.perf_counter()
    workers = []
    for index in range(args.max_k):
        command = [sys.executable, __file__, "--out", str(args.out), "--max-k", str(args.max_k)]
        logfile = (args.out / f"worker{index}.log").open("w")
        workers.append(
            subprocess.Popen([*command, "--worker", str(index), *bench_args], stdout=logfile, stderr=logfile)
        )
    while any(w.poll() is None for w in workers):
        if any(w.poll() for w in workers):  # one failed: the others would wait for it in vain
            for other in workers:
                if other.poll() is None:
                    other.terminate()
        time.sleep(1)
    codes = [w.wait() for w in workers]
    phases = summarise(args.out, args.max_k)
    report = {"command": sys.argv, "worker_exit_codes": codes, "wall_seconds": time.perf_counter() - started}
    (args.out / "gpu_share.json").write_text(json.dumps({**report, "phases": phases}, indent=2) + "\n")
    print(table(phases))
    log.info("wrote %s (worker logs: %s/worker*.log)", args.out / "gpu_share.json", args.out)
    if any(codes):
        sys.exit(1)


if __name__ == "__main__":
    main()
