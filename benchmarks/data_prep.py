"""CPU data-pipeline throughput: alpaca rows of realistic length through the project's own DataModule
(read the JSONL file -> chat template -> tokenize -> prompt masking -> length policy -> packing),
cold (a fresh data cache, whose write is included), then once more from the cache it wrote, for each
tokenizer and `data.packing` mode. Prints a Markdown table (the CLI's output).

    python benchmarks/data_prep.py [--rows 20000] [--tokenizers tiny real] [--packing none packed]
    make bench-data ARGS="--rows 20000"

Rows: `qlora_exp.bench.long_form_rows`, the built-in examples joined to log-normal token lengths
(median 190, sigma 0.55 by default, as `qlora-bench --data long`), written to a JSONL file once and
reused from $QLORA_EXP_CACHE/bench/ afterwards; or your own alpaca file with --data.

Tokenizers: `tiny` is the embedded model's (1,024-token byte-level BPE trained on the built-in data).
`real` is a byte-level BPE with a realistic vocabulary (--real-vocab, default 65,536) that this script
trains with the `tokenizers` library on the Python sources of the installed transformers package
(English docstrings and code; about 20 s, once, cached), with Gemma's special tokens and turn template.
It is a real-size Rust fast tokenizer, not Gemma's own (256k vocabulary, other merges), so its token
counts differ from Gemma's; its cost per token is of the same kind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc
import transformers
from datasets import Dataset, disable_progress_bars
from transformers import AutoTokenizer

from qlora_exp.bench.data import long_form_rows
from qlora_exp.cache import cache_root
from qlora_exp.data.module import DataModule
from qlora_exp.embedded import resolve_embedded, train_tokenizer
from qlora_exp.embedded.families import GEMMA2_CHAT
from qlora_exp.schema import DataConfig

log = logging.getLogger(__name__)

TOKENIZERS = ("tiny", "real")
PACKING_MODES = ("none", "padding_free", "packed")


def reference_tokenizer_dir(vocab_size: int, corpus_mb: float) -> Path:
    """A byte-level BPE of `vocab_size` trained on the first `corpus_mb` MB of transformers' own Python
    sources (sorted paths), saved once as tokenizer.json with a chat template."""
    name = f"bpe{vocab_size}-transformers{transformers.__version__}-{corpus_mb:g}mb"
    target = cache_root() / "bench" / name
    if (target / "tokenizer.json").is_file():
        return target
    corpus, size = [], 0
    for path in sorted(Path(transformers.__file__).parent.rglob("*.py")):
        if size >= corpus_mb * 1e6:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        corpus.append(text)
        size += len(text)
    started = time.perf_counter()
    tokenizer = train_tokenizer(vocab_size, GEMMA2_CHAT, corpus=corpus)
    log.info(
        "trained a %d-token BPE on %.1f MB of transformers sources in %.1f s",
        len(tokenizer),
        size / 1e6,
        time.perf_counter() - started,
    )
    tokenizer.save_pretrained(target)
    return target


def alpaca_file(rows: int, seed: int, median_tokens: float, sigma: float, max_length: int) -> Path:
    """A JSONL file of `rows` alpaca rows with log-normal lengths, written once and reused."""
    path = cache_root() / "bench" / f"alpaca-{rows}-seed{seed}-median{median_tokens:g}-sigma{sigma:g}.jsonl"
    if path.is_file():
        return path
    started = time.perf_counter()
    tiny = AutoTokenizer.from_pretrained(resolve_embedded("embedded:tiny-gemma2"))
    examples = long_form_rows(
        rows, seed=seed, median_tokens=median_tokens, sigma=sigma, tokenizer=tiny, max_length=max_length
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in examples), encoding="utf-8")
    staging.rename(path)
    log.info(
        "wrote %d rows to %s in %.1f s (not part of the timings)", rows, path, time.perf_counter() - started
    )
    return path


def dataset_tokens(dataset: Dataset) -> int:
    """Tokens in a dataset's input_ids (examples, or packed bins)."""
    return int(pc.sum(pc.list_value_length(dataset.data.column("input_ids"))).as_py())


def measure(cfg: DataConfig, tokenizer_dir: Path, batch_size: int) -> dict[str, float | int | str]:
    """One cold and one cached DataModule.setup on a fresh data cache, with what they produced."""
    previous = os.environ.get("QLORA_EXP_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["QLORA_EXP_CACHE"] = cache  # a fresh data cache: the first setup is cold
        try:
            seconds = []
            for _ in range(2):
                data = DataModule(cfg, AutoTokenizer.from_pretrained(tokenizer_dir), 42, batch_size)
                data.setup()
                seconds.append(data.stats.prepare_seconds)
        finally:
            if previous is None:
                os.environ.pop("QLORA_EXP_CACHE")
            else:
                os.environ["QLORA_EXP_CACHE"] = previous
    assert data.train_dataset is not None and data.val_dataset is not None
    stats = data.stats.to_dict()
    tokens = dataset_tokens(data.train_dataset) + dataset_tokens(data.val_dataset)
    return {
        "rows": stats["rows_read"],
        "kept": stats["rows_kept"],
        "tokens": tokens,
        "mean_length": stats["length"]["mean"],
        "cold_s": seconds[0],
        "cached_s": seconds[1],
        "examples_per_min": stats["rows_read"] / seconds[0] * 60,
        "tokens_per_s": tokens / seconds[0],
        "batch_rows": stats["packing"]["batch_rows"],
        "efficiency": stats["packing"]["efficiency"],
    }


def main(argv: list[str] | None = None) -> None:
    """Print the throughput table (CLI table output)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20000, help="alpaca rows to generate (default 20000)")
    parser.add_argument(
        "--data", type=Path, help="your own alpaca .jsonl/.json file instead of generated rows"
    )
    parser.add_argument("--tokenizers", nargs="+", choices=TOKENIZERS, default=list(TOKENIZERS))
    parser.add_argument("--packing", nargs="+", choices=PACKING_MODES, default=list(PACKING_MODES))
    parser.add_argument("--max-length", type=int, default=2048, help="data.max_length (packed bin size)")
    parser.add_argument("--batch-size", type=int, default=8, help="for the padding estimate only")
    parser.add_argument("--median-tokens", type=float, default=190.0)
    parser.add_argument("--sigma", type=float, default=0.55)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real-vocab", type=int, default=65536, help="vocabulary of the real-size BPE")
    parser.add_argument("--corpus-mb", type=float, default=60.0, help="MB of text to train it on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    disable_progress_bars()
    # The DataModule's per-setup summary and drop warnings: the table's rows and kept columns say it.
    for noisy in ("qlora_exp.data.module", "qlora_exp.data.cache"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    path = args.data or alpaca_file(args.rows, args.seed, args.median_tokens, args.sigma, args.max_length)
    tokenizer_dirs = {
        "tiny": resolve_embedded("embedded:tiny-gemma2"),
        "real": reference_tokenizer_dir(args.real_vocab, args.corpus_mb)
        if "real" in args.tokenizers
        else None,
    }
    print(f"data: {path}")
    print(
        "| tokenizer | vocab | packing | rows | kept | tokens | mean length | cold s | examples/min "
        "| tokens/s | cached s | batch rows | efficiency |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.tokenizers:
        tokenizer_dir = tokenizer_dirs[name]
        assert tokenizer_dir is not None
        vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
        for mode in args.packing:
            cfg = DataConfig(
                source="local", path=str(path), format="alpaca", max_length=args.max_length, packing=mode
            )
            r = measure(cfg, tokenizer_dir, args.batch_size)
            print(
                f"| {name} | {vocab} | {mode} | {r['rows']} | {r['kept']} | {r['tokens']} "
                f"| {r['mean_length']:.0f} | {r['cold_s']:.2f} | {r['examples_per_min']:,.0f} "
                f"| {r['tokens_per_s']:,.0f} | {r['cached_s']:.2f} | {r['batch_rows']} "
                f"| {r['efficiency']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
