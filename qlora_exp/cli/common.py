"""What every console script shares: logging to stderr and one way to end on an error."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from qlora_exp.errors import QloraError, exit_code_for

log = logging.getLogger(__name__)


def configure_cli_logging() -> None:
    """INFO logs on stderr, so that stdout carries only the command's output."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")


@contextmanager
def exit_on_error() -> Iterator[None]:
    """End a failure we understand (a QloraError, CUDA out of memory) with its documented exit code
    (`errors.exit_code_for`) and a one-line message; anything else propagates with its traceback."""
    try:
        yield
    except (QloraError, torch.OutOfMemoryError) as exc:
        log.error("%s", exc)
        raise SystemExit(exit_code_for(exc)) from exc
