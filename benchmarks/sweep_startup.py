"""Start-up of a sweep's jobs: seconds from a job's start to its first optimizer step done.

What the compile cache and the baseline cache (qlora_exp/cache.py, qlora_exp/baseline.py) buy a
sweep (issue 18, item 2), on a machine whose caches start empty:

1. `qlora-train -m` over lora.r=8,16 (Hydra's basic launcher: both jobs in one process). Job 1
   starts cold: it pays the imports, the model load, the held-out generations and the evaluation
   before training, and the first step's compiles. Job 2 reads the untrained baseline job 1 stored
   and reuses the process's compiled kernels.
2. One more job, lora.r=32, in a new process (as a launcher with a process per job runs it: SLURM,
   Ray, submitit): it loads the compiled kernels from $QLORA_EXP_CACHE/compile instead of compiling.

Each job's `startup_seconds` (metrics.json: from its start, the process's start for a process's
first job, to the end of its first optimizer step) and `startup_seconds_to_train_begin` (data and
model ready) are printed as a table and written to OUT/startup.json. An embedded checkpoint is built
before the first job, and timed apart; the jobs then use an empty cache root, OUT/cache, that links
to it, so that the first job starts cold even on a machine that ran it before. Extra arguments are
overrides for every job.

    python benchmarks/sweep_startup.py --out DIR     # GPU: experiment=gemma2_9b_gpu, embedded:gemma2-9b
    python benchmarks/sweep_startup.py --out DIR --experiment smoke --model embedded:tiny-gemma2   # CPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from qlora_exp.cache import EMBEDDED_DIR, INDUCTOR_CACHE_ENV, TRITON_CACHE_ENV, cache_root
from qlora_exp.embedded import is_embedded, resolve_embedded
from qlora_exp.run.directory import METRICS

log = logging.getLogger("sweep_startup")

# Two steps, evaluated before and after only; the start-up is what is measured.
SHORT_JOB = ("trainer.max_steps=2", "trainer.logging_steps=1", "trainer.eval_steps=0", "tracking=none")


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the sweeps and startup.json")
    parser.add_argument("--experiment", default="gemma2_9b_gpu" if gpu else "smoke")
    parser.add_argument("--model", default="embedded:gemma2-9b" if gpu else "embedded:tiny-gemma2")
    return parser.parse_known_args()


def sweep(out: Path, name: str, ranks: str, overrides: list[str]) -> tuple[int, float]:
    """One `qlora-train -m` process over `ranks`; its exit code and wall seconds (log in OUT/NAME.log)."""
    command = [sys.executable, "-m", "qlora_exp.cli.train", "-m", f"lora.r={ranks}", *overrides]
    started = time.perf_counter()
    with (out / f"{name}.log").open("w") as logfile:
        code = subprocess.run(
            [*command, f"hydra.sweep.dir={out / name}"], stdout=logfile, stderr=logfile, check=False
        ).returncode
    return code, time.perf_counter() - started


def job_figures(job_dir: Path) -> dict[str, Any]:
    metrics_file = job_dir / METRICS
    if not metrics_file.is_file():
        return {"job": job_dir.name, "error": "no metrics.json: see the log"}
    metrics = json.loads(metrics_file.read_text())
    log_text = (job_dir / "train.log").read_text() if (job_dir / "train.log").is_file() else ""
    return {
        "job": job_dir.name,
        "startup_seconds": metrics.get("startup_seconds"),
        "startup_seconds_to_train_begin": metrics.get("startup_seconds_to_train_begin"),
        "baseline_from_cache": "baseline cache: evaluation.json read from" in log_text,
        "peak_memory_gb": metrics.get("peak_memory_gb"),
        "eval_loss_before": metrics.get("eval_loss_before"),
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, extra = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"command": sys.argv, "processes": []}
    if is_embedded(args.model):
        started = time.perf_counter()
        resolve_embedded(args.model)
        report["embedded_build_or_lookup_seconds"] = time.perf_counter() - started
    # Cold for the first job whatever ran on this machine before: the jobs get an empty cache root
    # (tokenized data, baselines, compiled kernels) that shares only the built embedded checkpoints.
    fresh = args.out / "cache"
    fresh.mkdir(exist_ok=True)
    if not (fresh / EMBEDDED_DIR).exists():
        (fresh / EMBEDDED_DIR).symlink_to(cache_root() / EMBEDDED_DIR)
    os.environ["QLORA_EXP_CACHE"] = str(fresh)
    for env in (INDUCTOR_CACHE_ENV, TRITON_CACHE_ENV):
        os.environ.pop(env, None)  # torch may have written its defaults there; the jobs pick their own
    overrides = [f"experiment={args.experiment}", f"model.name_or_path={args.model}", *SHORT_JOB, *extra]
    rows = []
    for name, ranks, what in (
        ("sweep", "8,16", "2-job sweep, one process"),
        ("next_process", "32", "a later job in a new process"),
    ):
        code, wall = sweep(args.out, name, ranks, overrides)
        job_dirs = [d for d in (args.out / name).iterdir() if (d / ".hydra").is_dir()]
        jobs = [job_figures(d) for d in sorted(job_dirs, key=lambda d: (d / ".hydra").stat().st_mtime)]
        report["processes"].append(
            {"name": name, "what": what, "exit_code": code, "wall_seconds": wall, "jobs": jobs}
        )
        (args.out / "startup.json").write_text(json.dumps(report, indent=2) + "\n")
        rows += [(what, job, wall) for job in jobs]
    print("| process | job | start -> first step done (s) | start -> training begins (s) | baseline cached |")
    print("|---|---|---|---|---|")
    for what, job, _ in rows:
        first_step = job.get("startup_seconds")
        begin = job.get("startup_seconds_to_train_begin")
        print(
            f"| {what} | {job['job']} | {first_step:.1f} | {begin:.1f} | {job['baseline_from_cache']} |"
            if first_step is not None and begin is not None
            else f"| {what} | {job['job']} | {job.get('error', 'n/a')} | | |"
        )
    log.info("wrote %s", args.out / "startup.json")
    if any(p["exit_code"] for p in report["processes"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
