# Every target works on a fresh clone: it creates .venv, installs the CPU build of
# torch first when torch is missing (a loose requirement would otherwise pull
# several GB of CUDA wheels), then the package with the extras the target needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv install demo test lint typecheck pytest parity bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIN)
	touch $@

$(STAMP): pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e ".[dev,demo]"
	touch $@

venv install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bnkit demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy src

# The TensorFlow parity suite runs in `make parity`, which installs TensorFlow first.
pytest: $(STAMP)
	$(PY) -m pytest -q --ignore=tests/parity

TF_STAMP := $(VENV)/.installed-tf

$(TF_STAMP): pyproject.toml $(STAMP)
	$(PIP) install -q -e ".[dev,demo,tf]"
	touch $@

# Every parity test must run against real TensorFlow: a skipped one fails the target.
parity: $(TF_STAMP)
	BNKIT_PARITY_STRICT=1 $(PY) -m pytest -q tests/parity

test: lint typecheck pytest

bench: $(STAMP)
	$(VENV)/bin/bnkit bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
