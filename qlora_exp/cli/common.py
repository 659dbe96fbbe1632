"""What every console script shares: logging to stderr (ending on an error: `errors.exit_on_error`)."""

from __future__ import annotations

import logging
import sys


def configure_cli_logging() -> None:
    """INFO logs on stderr, so that stdout carries only the command's output."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
