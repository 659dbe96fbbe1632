"""pytest's entry to the shared test set-up, fixtures and helpers in tests/support.py.

support.py is loaded as a plugin in every process that runs tests, but not in pytest-xdist's
controller (`make test`), which only hands tests out: importing torch, transformers and the project
there (~15 s on 2 cores) would hold back the start of every worker.
"""

from __future__ import annotations

import gc

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Load tests/support.py unless this process is xdist's controller, with Python's cyclic garbage
    collector off during its imports, as the console scripts import theirs (`qlora_exp.cli`); support.py
    turns it back on once the tests are collected."""
    worker = hasattr(config, "workerinput")
    controller = not worker and bool(getattr(config.option, "numprocesses", None))
    if not controller:
        gc.disable()
        config.pluginmanager.import_plugin("tests.support")
