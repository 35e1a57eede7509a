# The README's commands. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch==2.13.0 is the release whose CPU wheel this project's build machines keep on disk, so set-up
# there downloads nothing large. Elsewhere pip takes the normal wheel for your platform (CUDA on
# Linux). For another build: `make setup TORCH="torch==2.15.0"` or
# `make setup TORCH="torch --index-url https://download.pytorch.org/whl/cu126"`.
TORCH  ?= torch==2.13.0
DEMO_RUN ?= runs/demo

.PHONY: setup demo test lint bench bench-llama-server clean test-llama test-lmeval

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[serve,data,dev,track,hf,gguf,notebook,structured]"
	touch $@

demo: setup
	$(BIN)/minigpt train --preset small --out $(DEMO_RUN) --overwrite
	$(BIN)/minigpt sample $(DEMO_RUN) --prompt "ROMEO:" --max-new-tokens 300 --seed 1

test: setup
	$(BIN)/python -m pytest -q

# llama-cpp-python compiles llama.cpp from source: minutes on 2 idle cores (50 on a busy machine), once.
test-llama: setup
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --quiet -e ".[llama]"
	$(BIN)/python -m pytest -q tests/test_export_gguf.py

# lm-evaluation-harness (with datasets, scikit-learn, ...) as a client of `minigpt serve`.
test-lmeval: setup
	$(BIN)/pip install --quiet -e ".[lmeval]"
	$(BIN)/python -m pytest -q tests/test_lm_eval.py

bench: setup
	$(BIN)/minigpt bench train
	$(BIN)/minigpt bench generate

# `minigpt serve` against llama.cpp's llama-server (benchmarks/serve_vs_llama.py). llama-server is
# built once from the llama.cpp that the llama-cpp-python sdist vendors (8-12 minutes on 2 cores),
# cached outside the repository.
LLAMA_CPP_PYTHON ?= 0.3.36
LLAMA_CACHE ?= $(HOME)/.cache/minigpt/llama-server-$(LLAMA_CPP_PYTHON)
LLAMA_SERVER := $(LLAMA_CACHE)/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/build/bin/llama-server

$(LLAMA_SERVER): | setup
	mkdir -p $(LLAMA_CACHE)
	cd $(LLAMA_CACHE) && $(abspath $(BIN))/pip download --quiet --no-deps --no-binary :all: \
		llama-cpp-python==$(LLAMA_CPP_PYTHON) -d . && tar xzf llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
	cd $(LLAMA_CACHE)/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp && \
		cmake -B build -DLLAMA_CURL=OFF && cmake --build build --target llama-server -j$$(nproc)

bench-llama-server: setup $(LLAMA_SERVER)
	$(BIN)/python benchmarks/serve_vs_llama.py --llama-server $(LLAMA_SERVER)

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
