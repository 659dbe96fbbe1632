"""qlora-bench: trainer settings side by side on one loaded model (qlora_exp/bench/)."""

from __future__ import annotations

import logging
import sys

from qlora_exp.bench.options import parse_options
from qlora_exp.bench.run import run_bench
from qlora_exp.cli import imports_done
from qlora_exp.errors import exit_on_error


def main(argv: list[str] | None = None) -> None:
    """Console entry point (`qlora-bench`, `python -m qlora_exp.bench`, `make bench`)."""
    imports_done()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with exit_on_error():
        options = parse_options(argv)
        run_bench(options, " ".join(["qlora-bench", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    main()
