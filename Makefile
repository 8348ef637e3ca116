# Two commands for a fresh machine: `make demo` (set up + run the main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.f2llm-installed

# CPU tensors run Triton kernels through its interpreter; nothing is fetched from a model hub.
TEST_ENV := TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test lint bench-cpu clean

setup: $(STAMP)

# torch first and pinned: on a CPU machine `pip install torch==2.13.0` takes the local CPU build (a bare
# `torch` requirement would pull a multi-GB CUDA build); on a GPU machine the same line gets the CUDA build.
# DS_BUILD_OPS=0: DeepSpeed's C++/CUDA ops are compiled on first use, not at install time.
$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# The main job: the CPU training demo (f2llm/demo.py): mine, evaluate, train under torchrun, evaluate again.
demo: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m f2llm.demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(TEST_ENV) $(BIN)/pytest -n 2 --durations=15

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-cpu: $(STAMP)
	$(TEST_ENV) $(BIN)/python benchmarks/bench_pooling.py --cpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .benchmarks
