# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# CPU wheel by default; GPU users: make demo TORCH_SPEC="torch==2.13.0" PIP_EXTRA="--index-url ..."
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
SOURCES := pyproject.toml $(shell find neuralpde_cli configs -name '*.py' -o -name '*.yaml' 2>/dev/null)

.PHONY: install demo test test-all bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)" $(PIP_EXTRA)
	touch $@

# a regular (non-editable) install: the configs ship inside the package, as for users
$(VENV)/.installed: $(VENV)/.torch $(SOURCES)
	$(BIN)/pip install -q ".[test,launchers,tune,tensorboard]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/neuralpde solve device=cpu

# two workers: the suite is mostly subprocesses of one torch thread each (tests/conftest.py)
test: install
	$(BIN)/python -m pytest -q -n 2 -m "not slow" --durations=25 tests

test-all: install
	$(BIN)/python -m pytest -q tests

$(VENV)/.bench: $(VENV)/.installed
	$(BIN)/pip install -q ".[bench]"
	touch $@

bench: $(VENV)/.bench
	$(BIN)/python -m benchmarks.run

bench-quick: $(VENV)/.bench
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf $(VENV) build *.egg-info
