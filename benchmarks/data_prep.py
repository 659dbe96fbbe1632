"""Data preparation figures on the default synthetic set with the embedded tokenizer:
cold vs cached preparation time, and packing efficiency per `data.packing` mode.

    python benchmarks/data_prep.py [--rows 2000] [--max-length 512] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile

from transformers import AutoTokenizer

from qlora_exp.data import DataModule
from qlora_exp.embedded_model import resolve_embedded
from qlora_exp.schema import DataConfig


def main() -> None:
    """Print the figures (CLI table output)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    tokenizer_dir = resolve_embedded("embedded:tiny-gemma2")  # from the usual cache
    with tempfile.TemporaryDirectory() as cache:
        os.environ["QLORA_EXP_CACHE"] = cache  # a fresh data cache: the first run is cold
        for mode in ("none", "padding_free", "packed"):
            cfg = DataConfig(synthetic_size=args.rows, max_length=args.max_length, packing=mode)
            times = []
            for _ in range(2):
                data = DataModule(cfg, AutoTokenizer.from_pretrained(tokenizer_dir), 42, args.batch_size)
                data.setup()
                times.append(data.stats.prepare_seconds)
            packing = data.stats.to_dict()["packing"]
            print(
                f"{mode:<13} prepare cold {times[0]:6.2f} s, cached {times[1]:5.2f} s "
                f"({times[1] / times[0]:.1%} of cold); train rows {data.stats.train_rows}, "
                f"batch rows {packing['batch_rows']}, efficiency {packing['efficiency']:.3f}"
                + (f", bin fill {packing['bin_fill']:.3f}" if "bin_fill" in packing else "")
            )


if __name__ == "__main__":
    main()
