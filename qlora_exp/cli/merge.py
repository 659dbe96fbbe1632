"""qlora-merge RUN_DIR --out DIR [--dtype bf16|fp16]: one ordinary checkpoint, no peft needed.

The adapter is merged into the base weights loaded in 16 bit, not into the 4-bit ones training
used: merging into quantized weights would round the update away (and bitsandbytes checkpoints
need bitsandbytes to load). The result is written to a staging directory and renamed into place,
so `--out` never holds half a model; an existing non-empty `--out` is refused, never overwritten.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from qlora_exp.cli import imports_done
from qlora_exp.cli.common import configure_cli_logging
from qlora_exp.errors import RunDirectoryError, exit_on_error
from qlora_exp.run.finished import FinishedRun

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MERGE_INFO = "qlora_merge.json"


def check_output_dir(out: Path) -> None:
    """Refuse an --out that exists as a file or as a directory with anything in it."""
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise RunDirectoryError(
            f"--out {out} exists and is not empty; refusing to overwrite it. "
            "Fix: pass a new or empty directory"
        )


def merge_run(run: FinishedRun, out: Path, dtype: str) -> None:
    """Merge the run's adapter into its 16-bit base model and save model + tokenizer to `out`."""
    check_output_dir(out)
    model = run.load_16bit_model(DTYPES[dtype])
    log.info("merging adapter into %s weights", dtype)
    merged = model.merge_and_unload()
    tokenizer = run.load_tokenizer()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        info = {"run_dir": str(run.path.resolve()), "base": run.config.model.name_or_path, "dtype": dtype}
        (staging / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        check_output_dir(out)  # again: another process may have filled it meanwhile
        if out.is_dir():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("merged model written to %s (load it with AutoModelForCausalLM.from_pretrained)", out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="qlora-merge", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a completed qlora-train run directory")
    parser.add_argument(
        "--out", type=Path, required=True, help="new (or empty) directory for the merged model"
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="bf16", help="weights' dtype (default bf16)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    imports_done()
    args = parse_args(argv)
    configure_cli_logging()
    with exit_on_error():
        merge_run(FinishedRun(args.run_dir), args.out, args.dtype)


if __name__ == "__main__":
    main()
