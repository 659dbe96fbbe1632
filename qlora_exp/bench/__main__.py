"""`python -m qlora_exp.bench`: the same as the `qlora-bench` console script."""

from qlora_exp.cli.bench import main

main()
