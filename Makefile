# gradstab: `make test` and `make demo` set everything up on a fresh machine (a .venv at the repo
# root with torch, the dev tools and gradstab built in place).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# The integrations' libraries (the extras `hf` and `lightning`), for their tests and examples.
EXTRAS_SPEC ?= transformers==5.18.0 accelerate==1.15.0 lightning==2.6.6
STAMP := $(VENV)/.gradstab-built
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h csrc/cuda/*.cpp)
PY_DIRS := $(wildcard gradstab tests benchmarks examples)
CLANG_FORMAT_FILES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h csrc/cuda/*.cpp tests/*.cpp)

.PHONY: setup test lint format cuda-check demo sdist wheel packaging-check

setup: $(STAMP) $(VENV)/.demo-deps $(VENV)/.deepspeed-installed

$(VENV)/.deps-installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" numpy pytest ruff clang-format ninja setuptools wheel build
	touch $@

# TORCH_SPEC again, so that pip keeps the installed torch rather than resolving another one.
$(VENV)/.extras-installed: $(VENV)/.deps-installed
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(EXTRAS_SPEC)
	touch $@

$(STAMP): $(VENV)/.deps-installed $(VENV)/.extras-installed $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(PY) -c "import gradstab, gradstab._C; print('gradstab', gradstab.__version__, 'backend:', gradstab.GradientStabilizer().backend)"
	touch $@

# DeepSpeed (the extra `deepspeed`), for its two-rank tests and example. Its sdist's setup.py
# imports torch, so it is built against the venv's torch (--no-build-isolation; ~15 s, no op is
# compiled ahead); TORCH_SPEC again so that pip keeps that torch.
DEEPSPEED_SPEC ?= deepspeed==0.19.8
$(VENV)/.deepspeed-installed: $(VENV)/.deps-installed
	$(PY) -m pip install --quiet --no-build-isolation "$(TORCH_SPEC)" "$(DEEPSPEED_SPEC)"
	touch $@

# The demo's plot (and its test) need matplotlib; the pin is the wheel this project's machines
# keep on disk. No torch comes with it.
$(VENV)/.demo-deps: $(VENV)/.deps-installed
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install --quiet "matplotlib==3.10.9"
	touch $@

# The release artifacts, in dist/ (docs/install.md). The sdist as a maintainer makes it: `python -m
# build` in its isolated environment, which has no torch; it carries csrc/. The wheel: gradstab._C
# built against .venv's torch, and csrc/ for any other torch.
DIST ?= dist
sdist: $(VENV)/.deps-installed
	rm -f $(DIST)/gradstab-*.tar.gz
	$(PY) -m build --sdist --outdir $(DIST) .

wheel: $(VENV)/.deps-installed
	rm -f $(DIST)/gradstab-*.whl
	$(PY) -m pip wheel --no-build-isolation --no-deps --no-cache-dir --wheel-dir $(DIST) .

# Installs the sdist and the wheel into fresh venvs by every route and checks the kernels run.
packaging-check: $(VENV)/.deps-installed
	bash .ci/packaging_check.sh

DEMO_OUT ?= out/demo.png
demo: setup
	$(PY) -m gradstab demo --out $(DEMO_OUT)

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

# Compiles every CUDA source for sm_80 and sm_90 with the machine's nvcc against the torch headers
# of .venv (no GPU and no CUDA build of torch needed), with the nvcc flags of the real build
# (gradstab/_build.py), and fails on an error or a register spill. It writes the PTX of each
# source (build/cuda-check/NAME.ptx for sm_90, NAME.sm_80.ptx) and fails on any floating-point
# fma/mad in it or any add/sub/mul without a rounding modifier (which ptxas may fuse): the device
# must round every operation as the CPU does (docs/cuda.md). The SASS is no guide for this: ptxas
# expands the exact div.rn and sqrt.rn into FMA sequences of its own.
NVCC ?= /usr/local/cuda/bin/nvcc
CUDA_SOURCES := $(wildcard csrc/cuda/*.cu)
CUDA_CHECK_DIR := build/cuda-check
PTX_TYPES := (f16|f16x2|bf16|bf16x2|f32|f64)
PTX_FUSED := \b(fma|mad)(\.[a-z0-9]+)*\.$(PTX_TYPES)\b
PTX_UNROUNDED := \b(add|sub|mul)(\.(ftz|sat))*\.$(PTX_TYPES)\b
PTX_ROUNDED := \b(add|sub|mul|div|sqrt)\.r[nzmp](\.[a-z0-9]+)*\.$(PTX_TYPES)\b
cuda-check: $(VENV)/.deps-installed
	@test -x $(NVCC) || { echo "cuda-check: no nvcc at $(NVCC) (set NVCC=...)"; exit 1; }
	@rm -rf $(CUDA_CHECK_DIR) && mkdir -p $(CUDA_CHECK_DIR)/include/c10/cuda/impl
	@# The CPU wheel ships the c10/cuda headers but not this generated one.
	@printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' \
	  > $(CUDA_CHECK_DIR)/include/c10/cuda/impl/cuda_cmake_macros.h
	@# One line per kernel and architecture from `ptxas -v`; exit status 1 on any spill.
	@printf '%s\n' \
	  '/Compiling entry function/ { split($$0, q, "'"'"'"); name = q[2]; arch = q[4] }' \
	  '/bytes spill stores/ { stores = $$5; loads = $$9; if (stores + loads > 0) bad = 1 }' \
	  '/Used [0-9]+ registers/ && name != "" { match(name, /[a-z_]*kernel/); \
	    printf "  %s %-20s %3d registers, %d bytes spill stores, %d loads\n", arch, \
	    substr(name, RSTART, RLENGTH), $$5, stores, loads; name = "" }' \
	  'END { exit bad }' > $(CUDA_CHECK_DIR)/ptxas.awk
	@set -e; torch_inc=$$($(PY) -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))"); \
	py_inc=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['include'])"); \
	nvcc_flags=$$($(PY) gradstab/_build.py nvcc-flags); \
	echo "nvcc flags: $$nvcc_flags"; \
	for src in $(CUDA_SOURCES); do \
	  name=$$(basename $$src .cu); keep=$(CUDA_CHECK_DIR)/keep-$$name; \
	  log=$(CUDA_CHECK_DIR)/$$name.log; mkdir -p $$keep; \
	  echo "nvcc $$src (sm_80, sm_90)"; \
	  $(NVCC) -c $$src -o $(CUDA_CHECK_DIR)/$$name.o -std=c++17 $$nvcc_flags \
	    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -Xptxas -v \
	    --keep --keep-dir $$keep \
	    -I$(CUDA_CHECK_DIR)/include $$torch_inc -I$$py_inc --compiler-options -fPIC \
	    -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1 \
	    > $$log 2>&1 || { cat $$log; exit 1; }; \
	  awk -f $(CUDA_CHECK_DIR)/ptxas.awk $$log || { echo "cuda-check: spills in $$src"; exit 1; }; \
	  mv $$keep/$$name.compute_90.ptx $(CUDA_CHECK_DIR)/$$name.ptx; \
	  mv $$keep/$$name.compute_80.ptx $(CUDA_CHECK_DIR)/$$name.sm_80.ptx; rm -rf $$keep; \
	  for ptx in $(CUDA_CHECK_DIR)/$$name.ptx $(CUDA_CHECK_DIR)/$$name.sm_80.ptx; do \
	    fused=$$(grep -cE '$(PTX_FUSED)' $$ptx || true); \
	    unrounded=$$(grep -cE '$(PTX_UNROUNDED)' $$ptx || true); \
	    rounded=$$(grep -cE '$(PTX_ROUNDED)' $$ptx || true); \
	    echo "  $$ptx: $$fused fma/mad, $$unrounded add/sub/mul without rounding mode, $$rounded rounded add/sub/mul/div/sqrt"; \
	    if [ "$$fused$$unrounded" != 00 ]; then \
	      grep -nE '$(PTX_FUSED)|$(PTX_UNROUNDED)' $$ptx | head -5; \
	      echo "cuda-check: $$src: contracted or contractible floating-point operations in $$ptx"; exit 1; \
	    fi; \
	  done; \
	done; echo "cuda-check: $(words $(CUDA_SOURCES)) CUDA sources compiled for sm_80 and sm_90, no spills, no fused or contractible floating-point operations"

# CPU benchmark (docs/benchmarks.md): the table on stdout, results in benchmarks/results/cpu.*;
# e.g. make bench BENCH_ARGS="--preset many-small --threads 1"
.PHONY: bench
bench: setup
	$(PY) benchmarks/run_cpu.py $(BENCH_ARGS)
