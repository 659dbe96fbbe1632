"""Random generator state that must not leak out of work done on the side."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Python's, NumPy's and torch's (CPU and current GPU) generators restored on exit, whatever ran inside.

    Work a run does only sometimes must not move the run's random numbers: building an embedded
    checkpoint on a cold cache (it seeds its own weights, inside a process that already called
    `set_seed`), and the step-0 evaluation that a job computes or reads from the baseline cache
    (creating its DataLoader draws a seed). Without this, LoRA's initialisation, the data order and
    dropout would depend on the state of a cache rather than on the seed.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
