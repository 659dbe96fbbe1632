"""Comparing finished runs: a sweep's jobs side by side (table, plots, mean ± std over seeds, a W&B
comparison run) and two runs' config and metric differences. `qlora-compare` is its command line."""
