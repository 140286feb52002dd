# The two commands a new user runs: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=  # e.g. make test PYTEST_ARGS="-m numerics"
# pytest-xdist workers for `make test` (0: in this process). The SLURM tests share one worker (one cluster start).
TEST_WORKERS ?= 2

.PHONY: venv demo test lint bench bench-gpu gpu-wheels gpu-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[dev,baselines,export,imagenet,s3,gcs]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m explainer.demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS) tests

lint: $(STAMP)
	$(PY) -m ruff check explainer launch tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_make_shards.py
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_train_step.py --device cpu

# Wheels for a GPU machine without internet access (benchmarks/gpu_check.sh installs them with --no-index): what a
# Python 3.12 image that already has torch, torchvision, accelerate, Pillow, matplotlib, PyYAML and tqdm lacks. Run
# where pip reaches the index and copy .gpu-wheels to the GPU machine with the checkout; for another Python, change
# --python-version (header of benchmarks/gpu_check.sh).
GPU_WHEELS := webdataset==1.0.2 braceexpand==0.1.7 captum==0.9.0
gpu-wheels:
	python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .gpu-wheels $(GPU_WHEELS)

# On the GPU machine: the whole check (< 8 min), JSON under benchmarks/results/
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) runs .bench
