# The two commands a new user runs: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench bench-gpu clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[dev,baselines,export]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m explainer.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check explainer launch tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_make_shards.py
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_train_step.py --device cpu

clean:
	rm -rf $(VENV) runs .bench
