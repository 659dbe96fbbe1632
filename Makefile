# qlora-exp: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# An exact torch pin: here pip takes the CPU wheel on local disk in seconds; on a GPU box the
# same pin resolves to PyPI's CUDA build. A torch already in the venv is kept as it is.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=
# pytest-xdist: two workers more than the CPUs this process may use (nproc: not xdist's `auto`, which
# counts physical cores, 1 on a 2-vCPU VM of one hyper-threaded core), at most 4 (each holds its own
# torch and models). The extra workers fill the cores while others wait on processes they started
# (Ray, submitit, torchrun, the chat terminal): on 2 cores 4m31s with 4 workers, 4m27s with 3 using
# ~7% less CPU (README, "Tests"). Each worker is given the next test (or xdist_group of tests sharing an
# expensive fixture) in collection order, the longest end-to-end tests first (tests/support.py).
# TEST_WORKERS= runs it in one process.
TEST_CPUS := $(shell n=$$(( $$(nproc 2>/dev/null || echo 2) + 2 )); [ $$n -gt 4 ] && n=4; echo $$n)
TEST_WORKERS ?= -n $(TEST_CPUS) --dist loadgroup --no-loadscope-reorder

NPROC ?= 2

.PHONY: help install train smoke train-ddp train-fsdp test test-fast lint bench bench-data clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## create .venv and install the project (editable) with dev tools

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev]"
# pip byte-compiles what it installs, but not an editable project's sources: compiled once here,
# not again in every process (with PYTHONDONTWRITEBYTECODE set, nothing would ever cache them).
	$(BIN)/python -m compileall -q qlora_exp hydra_plugins
	touch $@

train: install  ## run the default experiment offline (tiny embedded model); ARGS="..." adds overrides
	$(BIN)/qlora-train $(ARGS)

smoke: install  ## a seconds-long run (experiment=smoke)
	$(BIN)/qlora-train experiment=smoke $(ARGS)

train-ddp: install  ## one run, data-parallel over NPROC processes (GPUs, or CPU via gloo)
	$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m qlora_exp.cli.train $(ARGS)

train-fsdp: install  ## one run sharded with FSDP over NPROC GPUs (FSDP-QLoRA)
	$(BIN)/accelerate launch --config_file launch/fsdp_qlora.yaml --num_processes $(NPROC) \
		-m qlora_exp.cli.train experiment=fsdp_qlora $(ARGS)

sweep: install  ## a minutes-long rank x learning-rate grid of smoke runs, then qlora-compare on it
	$(BIN)/qlora-train "experiment=[rank_lr_grid,smoke]" hydra.sweep.dir=outputs/sweeps/rank_lr_smoke $(ARGS)
	$(BIN)/qlora-compare outputs/sweeps/rank_lr_smoke

test: install  ## the whole CPU test suite (what CI runs), one worker per core
	$(BIN)/pytest $(TEST_WORKERS) --durations=15 $(PYTEST_ARGS)

test-fast: install  ## the suite without the slow end-to-end runs
	$(BIN)/pytest $(TEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

lint: install  ## ruff and mypy
	$(BIN)/ruff check qlora_exp tests
	$(BIN)/ruff format --check qlora_exp tests
	$(BIN)/mypy qlora_exp

bench: install  ## trainer settings side by side (GPU: Gemma-2-9B shape; CPU: tiny); ARGS="..." adds options
	$(BIN)/qlora-bench $(ARGS)

bench-data: install  ## CPU data pipeline throughput (alpaca rows -> template -> tokenize -> mask -> pack); ARGS="..."
	$(BIN)/python benchmarks/data_prep.py $(ARGS)

clean:  ## remove run outputs and caches (not the venv, not the embedded model cache)
	rm -rf outputs multirun .pytest_cache .ruff_cache .mypy_cache
