"""qlora-bench: one model through several trainer settings, in one process, on identical data.

Each setting trains a fresh LoRA adapter (same seed, same examples in the same order, same
optimizer steps) on the same 4-bit base, so the settings differ only in layout and kernels:
how the examples of one optimizer step are laid out in micro-batches (padded to a fixed
length, padded to the longest row, or flattened without padding with position ids restarting
per example), the attention implementation, Liger's kernels and the dtype of the unquantized
parameters and of the residual stream. Per setting it reports real (non-pad) tokens/s over the
steps after warm-up, MFU, peak GPU memory and the mean loss of the first K steps, which must
agree with the eager, unpacked `baseline`: speed must never change the math.

The one exception is the `prototype` setting, which runs the prototype's way as it was: one
example per micro-batch and an optimizer step after each (batch size 1, no accumulation). It
takes more optimizer steps, so its loss is not compared, and it is timed on the first examples
of the same order in groups of at most settings.PROTOTYPE_EXAMPLES_PER_STEP: at ~1 s per example, its
pace is steady within a few examples, and 4 x 64 of them would take most of the time budget.

The loss of a step is the token mean over all of its examples whatever the micro-batching
(the Trainer passes `num_items_in_batch` to the model's loss), so the per-step losses of the
settings are comparable one to one.

Modules: `options` (the command line, frozen), `settings` (the named settings and what each
changes), `data` (the examples), `measure` (one setting's model, batches, steps and timing; the
batches come from the training path's collator), `recorder` (per-step timing inside the Trainer, on
the GPU's timeline), `timeline` (where a profiled step's GPU idled), `report` (bench.json, bench.md,
the table), `run` (load once, run every setting, write as it goes).
"""
