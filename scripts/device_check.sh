#!/usr/bin/env bash
# One device call: install the checkout, build the CUDA extension, run the GPU tests, `sale bench-op` (the op
# alone), then `sale latency` on a Llama-3.1-8B-shaped model with random weights.
# Usage on the GPU machine: OUT=/dir bash scripts/device_check.sh
set -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=16
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import pytest" 2>/dev/null || { python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; }
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING | tail -3
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
sale info 2>&1 | tail -20
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernel.py tests/test_gpu_runner.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
timeout 300 sale bench-op --lengths 32768,131072 --taus 0.004 --data structured,random --reps 5 \
  --out "$OUT/bench_op.json" 2>&1 | tee "$OUT/bench.log" | grep "^|"
LENGTHS=${LENGTHS:-8192,32768,131072}
python3 - <<'PY'
import torch
from sale_cli.eval.niah import write_config_dir
from sale_cli import thresholds
from sale_cli.options import SaleOptions
cfg = write_config_dir("/tmp/llama8b", "llama-3.1-8b")
thresholds.save("/tmp/llama8b_tau.safetensors", torch.full((cfg.num_hidden_layers, cfg.num_attention_heads), 0.004),
                model="llama8b", theta=0.0, tau0=0.004, samples=0, tokens=0, options=SaleOptions())
PY
timeout ${LATENCY_TIMEOUT:-300} sale latency /tmp/llama8b --random-weights --thresholds /tmp/llama8b_tau.safetensors \
  --lengths "$LENGTHS" --repeats 3 --results-dir "$OUT" 2>&1 | tee "$OUT/latency.log" | tail -30
