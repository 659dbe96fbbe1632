"""The console scripts (qlora-train, -compare, -generate, -chat, -merge, -bench) and their shared
logging and exit-code handling; the library they drive lives beside this package.

Start-up: importing this package turns Python's cyclic garbage collector off, and each script's entry
point turns it back on as its first statement (`imports_done`), with everything alive then frozen.
The imports every script makes (torch, transformers, peft, bitsandbytes: ~600k objects) otherwise
set off full collections over and over while they load, and every full collection after them (the
automatic ones as training allocates, the one at the end of each job) walks them all again, ~0.5
CPU-s each. They live as long as the process: frozen, collections skip them. A 6-step smoke run's
process: 21-25 CPU-s before, 15 after, on 2 cores. The launchers that start job processes (submitit,
Ray, joblib) import the task function, `cli.train.main`, from this package too, so their jobs start
the same way. Import this package only to run a script: the collector stays off until one starts.
"""

import gc

gc.disable()


def imports_done() -> None:
    """Freeze what is alive now (the imports) out of every later collection and turn the collector back
    on. Each console script's first statement; again at each job of a multirun in one process, after
    the previous job's objects were collected (`experiment.run_job`)."""
    gc.freeze()
    gc.enable()
