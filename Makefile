# Two commands on a fresh machine: `make demo` and `make test` (both set everything up).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch/torchvision: any release >= 2.6 works; on this project's machines pip resolves them
# from local wheels. Override, e.g. TORCH_SPEC="torch==2.6.0 torchvision==0.21.0".
TORCH_SPEC ?= torch torchvision
# The application's dependencies (pyproject.toml lists the same), installed before the
# extension build, which runs with --no-deps.
APP_DEPS := numpy pillow scipy scikit-learn matplotlib tqdm pyyaml nibabel openpyxl timm grad-cam pydicom onnx onnxruntime
MAX_JOBS ?= 2
# torch guesses CUDA_HOME from an nvcc shim in /usr/local/bin; point it at the real toolkit.
ifeq ($(CUDA_HOME),)
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME := /usr/local/cuda
endif
endif
# Compile the CUDA kernels whenever a CUDA toolkit is there, GPU or not, so that a CUDA
# compile error fails `make test` (and CI) even on a machine without a GPU.
ifneq ($(CUDA_HOME),)
FORCE_CUDA ?= 1
endif
export MAX_JOBS FORCE_CUDA

.PHONY: setup build test demo clean

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel ninja
	$(PIP) install $(TORCH_SPEC) $(APP_DEPS) pytest hypothesis
	touch $@

setup: $(VENV)/.deps

# Rebuild the extension whenever a C++/CUDA source or the build script changes.
$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*.h csrc/*/*.h csrc/*/*.cuh)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

# Second run: the Triton kernels on CPU under Triton's interpreter (it must be switched on
# before triton is imported, hence its own process), through the same SPEC tests.
test: build
	$(PY) -m pytest -q -rfE
	TRITON_INTERPRET=1 $(PY) -m pytest -q -rfE tests/test_ops.py tests/test_validation.py tests/test_triton.py -k triton

demo: build
	$(PY) -m mutex_attn.demo

clean:
	rm -rf build *.egg-info mutex_attn/*.so $(VENV)/.built
