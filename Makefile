# gradstab: `make test` and `make demo` set everything up on a fresh machine (a .venv at the repo
# root with torch, the dev tools and gradstab built in place).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.gradstab-built
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp)
PY_DIRS := $(wildcard gradstab tests benchmarks examples)
CLANG_FORMAT_FILES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp)

.PHONY: setup test lint format

setup: $(STAMP)

$(VENV)/.deps-installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" numpy pytest ruff clang-format ninja setuptools wheel
	touch $@

$(STAMP): $(VENV)/.deps-installed $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(PY) -c "import gradstab, gradstab._C; print('gradstab', gradstab.__version__, 'backend:', gradstab.GradientStabilizer().backend)"
	touch $@

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check $(PY_DIRS)
	$(VENV)/bin/ruff format --check $(PY_DIRS)
	$(VENV)/bin/clang-format --dry-run --Werror $(CLANG_FORMAT_FILES)

format: setup
	$(VENV)/bin/ruff check --fix $(PY_DIRS)
	$(VENV)/bin/ruff format $(PY_DIRS)
	$(VENV)/bin/clang-format -i $(CLANG_FORMAT_FILES)

# CPU benchmark (docs/benchmarks.md): the table on stdout, results in benchmarks/results/cpu.*;
# e.g. make bench BENCH_ARGS="--preset many-small --threads 1"
.PHONY: bench
bench: setup
	$(PY) benchmarks/run_cpu.py $(BENCH_ARGS)
