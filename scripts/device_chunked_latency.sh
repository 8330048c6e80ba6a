#!/usr/bin/env bash
# One device call: build, every GPU-marked test, then `sale latency` on a Llama-3.1-8B config with random weights
# (tau 0.004 on every head) at LENGTH tokens, whole prompt vs prefill chunks of CHUNKS (issue 14's check that
# chunked prefill costs at most 10% over the whole prompt, dense and SALE, attention over all 32 layers).
# Usage (repo root, GPU machine): OUT=/some/dir [LENGTH=131072 CHUNKS="16384"] bash scripts/device_chunked_latency.sh
source "$(dirname "$0")/device_setup.sh"
LENGTH=${LENGTH:-131072}
CHUNKS=${CHUNKS:-16384}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "from sale_cli.kernels import cuda_backend as c; print('available:', c.available())" 2>&1 | tail -1
stamp build
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -W ignore::UserWarning -m gpu tests/ 2>&1 \
    | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|Error" | tail -25
  stamp tests
fi
python3 - <<'PY'
import torch
from sale_cli import thresholds
from sale_cli.eval.niah import write_config_dir
from sale_cli.options import SaleOptions
cfg = write_config_dir("/tmp/llama8b", "llama-3.1-8b")
thresholds.save("/tmp/llama8b_tau.safetensors", torch.full((cfg.num_hidden_layers, cfg.num_attention_heads), 0.004),
                model="llama8b", theta=0.0, tau0=0.004, samples=0, tokens=0, options=SaleOptions())
PY
for chunk in 0 $CHUNKS; do
  timeout ${LATENCY_TIMEOUT:-240} python3 -m sale_cli.cli latency /tmp/llama8b --random-weights \
    --thresholds /tmp/llama8b_tau.safetensors --lengths "$LENGTH" --repeats ${REPEATS:-2} --warmup 1 \
    --prefill-chunk "$chunk" --results-dir "$OUT" --exp "latency_chunk$chunk" 2>&1 | tee "$OUT/latency_chunk$chunk.log" \
    | grep -v "^\s*$" | tail -12
  stamp "latency chunk $chunk"
done
