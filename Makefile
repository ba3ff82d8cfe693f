# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv on first use. torch==2.13.0 (CPU wheel) is installed first
# unless a torch is already importable, so that no dependency pulls a CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.carv-installed

.PHONY: demo test lint install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/carv-attrib demo demo-run

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check carv_attrib tests bench examples
	$(BIN)/ruff format --check carv_attrib tests bench examples

clean:
	rm -rf demo-run .pytest_cache
