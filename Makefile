# sale: common jobs. Everything runs in the active Python environment (a venv if one is active).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# torch is installed only when missing; point TORCH_SPEC at the build you want (e.g. a CPU or CUDA wheel).
TORCH_SPEC ?= torch
MODEL ?= smollm2-135m
THETA ?= 0.4
EXP ?= sale_default
STAMP := build/.installed

.PHONY: install test lint demo longbench infinitebench latency

$(STAMP): pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[eval,gguf,dev]"
	@mkdir -p build && touch $(STAMP)

install: $(STAMP)  ## editable install with all extras

test: $(STAMP)  ## the whole CPU test suite (GPU tests skip without CUDA)
	$(PYTHON) -m pytest -q -ra

lint: $(STAMP)
	$(PYTHON) -m ruff check sale_cli kernels eval data tests

demo: $(STAMP)  ## the main job on the demo model: calibrate, then passkey retrieval dense vs SALE
	sale demo
