# sale: common jobs. Everything runs in the active Python environment (a venv if one is active).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# torch is installed only when missing; point TORCH_SPEC at the build you want (e.g. a CPU or CUDA wheel).
# Machines that keep a CPU build of torch 2.13 in /opt/wheels (as CI's does) use it instead of a CUDA download.
TORCH_SPEC ?= $(if $(wildcard /opt/wheels/torch-2.13.0+cpu-*),torch==2.13.0,torch)
MODEL ?= smollm2-135m
THETA ?= 0.4
EXP ?= sale_default
STAMP := build/.installed

.PHONY: install test lint kernels-check demo longbench infinitebench latency latency-config bench-op

$(STAMP): pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[eval,gguf,dev]"
	@mkdir -p build && touch $(STAMP)

install: $(STAMP)  ## editable install with all extras

test: $(STAMP)  ## the whole CPU test suite (GPU tests skip without CUDA)
	$(PYTHON) -m pytest -q -ra

kernels-check:  ## nvcc compile check of every kernels/csrc/*.cu for sm_80, sm_89, sm_90a (registers, spills); no GPU needed
	bash scripts/check_kernels.sh

lint: $(STAMP)
	$(PYTHON) -m ruff check sale_cli kernels eval data tests

demo: $(STAMP)  ## the main job on the demo model: calibrate, then passkey retrieval dense vs SALE
	sale demo

# LongBench / InfiniteBench: SALE at THETA (THETA= runs dense); ARGS passes more options (e.g. ARGS="--limit 20").
# NPROC=1 (default): one process; a model that does not fit one GPU at its context length is spread over all
# visible GPUs (`sale plan MODEL` shows the placement). NPROC>1 shards samples over GPUs with torchrun, each
# process holding the whole model (refused up front when it cannot fit one GPU).
NPROC ?= 1
ARGS ?=
SALE_RUN = $(if $(filter-out 1,$(NPROC)),torchrun --nproc-per-node $(NPROC) -m sale_cli.cli,sale)
METHOD_ARGS = $(if $(strip $(THETA)),--method sale --theta $(THETA),--method dense)

longbench: $(STAMP)  ## LongBench (the paper's 14 datasets) for MODEL into results/EXP, then scored
	$(SALE_RUN) longbench $(MODEL) --exp $(EXP) $(METHOD_ARGS) $(ARGS)

infinitebench: $(STAMP)  ## InfiniteBench (the paper's 5 tasks) for MODEL into results/EXP, then scored
	$(SALE_RUN) infinitebench $(MODEL) --exp $(EXP) $(METHOD_ARGS) $(ARGS)

# Latency: LATENCY_ARGS passes more options (e.g. LATENCY_ARGS="--lengths 8192,16384 --repeats 3").
RANDOM_WEIGHTS ?=
LATENCY_ARGS ?=
LATENCY_PRESET ?= llama-3.1-8b
LATENCY_CONFIG_DIR ?= results/models/$(LATENCY_PRESET)-config

latency: $(STAMP)  ## NIAH prefill timing for MODEL, dense vs SALE at THETA
	sale latency $(MODEL) --exp $(EXP)-latency $(if $(THETA),--theta $(THETA)) $(if $(RANDOM_WEIGHTS),--random-weights) $(LATENCY_ARGS)

# config.json of LATENCY_PRESET plus a tokenizer trained on the bundled haystack; no weights.
latency-config: $(STAMP)  ## config + tokenizer of LATENCY_PRESET (no weights) for RANDOM_WEIGHTS=1 timing
	$(PYTHON) -c "from sale_cli.eval.niah import write_config_dir; write_config_dir('$(LATENCY_CONFIG_DIR)', '$(LATENCY_PRESET)')"

# Op benchmark (needs a CUDA GPU): BENCH_ARGS passes options (e.g. BENCH_ARGS="--lengths 32768,131072 --reps 3").
BENCH_ARGS ?=

bench-op: $(STAMP)  ## the attention op alone on Llama-3.1-8B shapes: SDPA backends vs SALE, into results/bench_op
	sale bench-op $(BENCH_ARGS)
