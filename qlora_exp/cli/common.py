"""What every console script shares: logging to stderr and one way to end on an error."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from qlora_exp.errors import ExitCode, exit_code_for

log = logging.getLogger(__name__)


def configure_cli_logging() -> None:
    """INFO logs on stderr, so that stdout carries only the command's output."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")


@contextmanager
def exit_on_error() -> Iterator[None]:
    """End with the failure's documented exit code (`errors.exit_code_for`) and a one-line message;
    only an unexpected error (exit 7) also logs its traceback."""
    try:
        yield
    except Exception as exc:
        code = exit_code_for(exc)
        if code == ExitCode.OTHER:
            log.exception("unexpected error")
        else:
            log.error("%s", exc)
        raise SystemExit(code) from exc
