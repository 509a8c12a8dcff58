# The two commands of the README: `make train` (the main job, end to end) and `make test` (the suite).
# Both set up .venv first (launch/setup.sh is idempotent).
SHELL := /bin/bash
VENV := .venv/bin
# The venv's tools first (its ninja builds DeepSpeed's ops; another ninja on PATH would rebuild them: jit_locks.py).
export PATH := $(CURDIR)/.venv/bin:$(PATH)
RUN_DIR ?= runs/llama_tiny

.PHONY: setup setup-test train test test-fast lint bench gpu-wheels
setup:
	@bash launch/setup.sh train

setup-test:
	@bash launch/setup.sh test

train: setup
	$(VENV)/megatron-adamc train --config configs/train/llama_tiny.yaml --output-dir $(RUN_DIR)

test: setup-test
	$(VENV)/ruff check . && $(VENV)/ruff format --check .
	$(VENV)/python -m pytest -q -n 2 --dist loadfile

# The unit tier (tests marked unit: model, config, plan, guard, schedule, resume rules, metrics file, tracking maths,
# data validation, HF mapping, checkpointer units, results docs, refusals): the loop while changing code.
test-fast: setup-test
	$(VENV)/python -m pytest -q -n 2 -m unit

bench: setup
	$(VENV)/python benchmarks/optimizer_step.py

# Wheels (and the Megatron-LM part) the GPU check carries to the device machine: .whl/ (ignored). docs/gpu.md
gpu-wheels: setup
	PYTHON=$(VENV)/python bash launch/gpu_wheels.sh
