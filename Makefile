# Each target sets up its own virtualenv on first use, so a fresh clone needs nothing but python3 and make.
VENV ?= .venv
PY := $(VENV)/bin/python
# The pinned CPU build of PyTorch comes from the machine's wheel folder when it lies there, else from
# PyTorch's CPU index (PyPI carries only the CUDA build under that version).
TORCH_INDEX ?= $(if $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl),,--extra-index-url https://download.pytorch.org/whl/cpu)

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt $(TORCH_INDEX) -e ".[dev]"
	touch $@

.PHONY: install demo test lint
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/reelflow demo

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
