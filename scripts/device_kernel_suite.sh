#!/usr/bin/env bash
# One device call for the CUDA kernels: install the checkout, build the extension, then the stages named in
# STAGES (default "tests sanitize bench"):
#   tests     pytest tests/test_cuda_kernel.py (+ the real Q/K/V file in results/qkv if carried) and
#             tests/test_block_sparse.py, tests/test_gpu_runner.py
#   sanitize  compute-sanitizer memcheck (and racecheck) on scripts/sanitize_case.py
#   profile   ncu on one launch of each of PROFILE_KERNELS (default: selection and computation kernels;
#             structured data, PROFILE_LENGTH tokens)
#   bench     sale bench-op with BENCH_ARGS
#   latency   sale latency on a Llama-3.1-8B-shaped model with random weights and tau 0.004 everywhere, at
#             LATENCY_LENGTHS (default 8192,32768,131072): the end-to-end measurement path
# Usage (repo root, on the GPU machine): OUT=/some/dir STAGES="tests bench" BENCH_ARGS="--lengths 32768" \
#   bash scripts/device_kernel_suite.sh
source "$(dirname "$0")/device_setup.sh"
STAGES=${STAGES:-tests sanitize bench}
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader
python3 -c "from sale_cli.kernels import cuda_backend as c; print('available:', c.available())" 2>&1 | tail -3
stamp build
has() { [[ " $STAGES " == *" $1 "* ]]; }
if has tests; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -s -p no:cacheprovider -W ignore::UserWarning \
    tests/test_cuda_kernel.py tests/test_block_sparse.py tests/test_gpu_runner.py ${TEST_ARGS:-} 2>&1 \
    | tee "$OUT/tests.log" | grep -E "passed|failed|error|differing|FAIL|Error" | tail -40
  stamp tests
fi
if has sanitize; then
  CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  timeout 200 "$CS" --tool memcheck --error-exitcode 9 python3 scripts/sanitize_case.py 2>&1 | tee "$OUT/memcheck.log" | tail -4
  echo "memcheck exit: $?"
  timeout 150 "$CS" --tool racecheck --error-exitcode 9 python3 scripts/sanitize_case.py --racecheck 2>&1 | tee "$OUT/racecheck.log" | tail -4
  echo "racecheck exit: $?"
  stamp sanitize
fi
if has profile; then
  NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  for kern in ${PROFILE_KERNELS:-sale_select_kernel sale_compute_kernel}; do
    timeout 150 "$NCU" -k regex:$kern -c 1 --set full python3 scripts/profile_kernels.py --length ${PROFILE_LENGTH:-32768} \
      >"$OUT/ncu_$kern.txt" 2>&1
    grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Issue Slots Busy|Executed Ipc|Stall|stall|L1/TEX Hit|Shared" "$OUT/ncu_$kern.txt" | head -40
  done
  stamp profile
fi
if has bench; then
  timeout ${BENCH_TIMEOUT:-400} python3 -m sale_cli.cli bench-op --out "$OUT/bench_op.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -v "^\s*$" | tail -60
  stamp bench
fi
if has latency; then
  python3 - <<'PY'
import torch
from sale_cli import thresholds
from sale_cli.eval.niah import write_config_dir
from sale_cli.options import SaleOptions
cfg = write_config_dir("/tmp/llama8b", "llama-3.1-8b")
thresholds.save("/tmp/llama8b_tau.safetensors", torch.full((cfg.num_hidden_layers, cfg.num_attention_heads), 0.004),
                model="llama8b", theta=0.0, tau0=0.004, samples=0, tokens=0, options=SaleOptions())
PY
  timeout ${LATENCY_TIMEOUT:-300} python3 -m sale_cli.cli latency /tmp/llama8b --random-weights \
    --thresholds /tmp/llama8b_tau.safetensors --lengths "${LATENCY_LENGTHS:-8192,32768,131072}" --repeats 3 \
    --results-dir "$OUT" 2>&1 | tee "$OUT/latency.log" | tail -30
  stamp latency
fi
