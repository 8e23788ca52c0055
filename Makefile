# Two commands for a fresh machine with Python 3.10+:
#   make lab    set up .venv and open the course in JupyterLab
#   make test   set up .venv and run the whole test suite
# Instructors: see "For instructors" in README.md (release, collect, autograde, feedback, grades).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Any torch >= 2.2 works; constraints.txt pins the release CI runs (a CPU build on CI's disk).
# `make lab CONSTRAINTS=` lifts the pin.
CONSTRAINTS ?= constraints.txt
# On Linux without an NVIDIA GPU, take PyTorch's CPU build (a fraction of the CUDA build's size).
TORCH_INDEX ?= $(shell [ "$$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1 && echo https://download.pytorch.org/whl/cpu)
PIP := $(BIN)/python -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
PHASE ?=

.PHONY: setup lab test release clean-notebooks validate collect collect-zip autograde feedback grades benchmark help

help:
	@sed -n '1,4p' Makefile | sed 's/^# *//'

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10) and "Python 3.10 or newer is needed (set PYTHON=python3.x)")'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(PIP) --retries 0 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) torch
	$(PIP) -e .
	@# The notebooks ask for this kernel by name, so they never run in another interpreter.
	$(BIN)/python -m ipykernel install --sys-prefix --name llm-course --display-name "LLM course" >/dev/null
	touch $@

setup: $(VENV)/.installed

lab: setup
	$(BIN)/jupyter lab --ServerApp.root_dir=course

test: setup
	$(BIN)/python -m pytest

# Instructor commands (python -m autograde --help lists them all).
release: setup
	$(BIN)/python -m autograde release $(if $(PHASE),--phase $(PHASE))

clean-notebooks: setup
	$(BIN)/python -m autograde clean

validate: setup
	$(BIN)/python -m autograde validate $(NOTEBOOK)

collect: setup
	$(BIN)/python -m autograde collect $(FROM) --phase $(PHASE)

collect-zip: setup
	$(BIN)/python -m autograde collect-zip $(ZIP) --phase $(PHASE)

autograde: setup
	$(BIN)/python -m autograde autograde $(if $(PHASE),--phase $(PHASE))

feedback: setup
	$(BIN)/python -m autograde feedback $(if $(PHASE),--phase $(PHASE))

grades: setup
	$(BIN)/python -m autograde export

benchmark: setup
	$(BIN)/python tests/benchmark.py
	$(BIN)/python tests/benchmark_parallelism.py
	$(BIN)/python tests/benchmark_scaling.py
	$(BIN)/python tests/benchmark_quantization.py
	$(BIN)/python tests/benchmark_rlhf.py
	$(BIN)/python tests/benchmark_sft.py
