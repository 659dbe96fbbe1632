"""`python -m qlora_exp.bench`: the same as the `qlora-bench` console script."""

from qlora_exp.bench.run import main

main()
