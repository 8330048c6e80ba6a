#!/usr/bin/env bash
# One device call: build the SALE CUDA extension, run its tests, run the kernel benchmark (dense cuDNN SDPA on
# the same data as the baseline).
# Usage (repo root, on the GPU machine): OUT=/some/dir bash scripts/device_cuda_kernel.sh
set -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=16
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import pytest" 2>/dev/null || { python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; }
# the device copy is not pip-installed: map sale_cli.kernels -> kernels/ (cwd's sale_cli shadows PYTHONPATH)
[ -e sale_cli/kernels ] || ln -s ../kernels sale_cli/kernels
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader
t0=$(date +%s)
python3 -c "from sale_cli.kernels import cuda_backend as c; print('available:', c.available())" 2>&1 | tee "$OUT/build.log" | tail -5
echo "build: $(( $(date +%s) - t0 )) s"
timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_cuda_kernel.py 2>&1 | tee "$OUT/test.log" | tail -40 \
  || echo "== tests FAILED (full log: $OUT/test.log)"
echo "tests done: $(( $(date +%s) - t0 )) s"
B="python3 -m sale_cli.kernels.bench_kernel --taus 0.004 --reps ${REPS:-3}"
timeout 130 $B --lengths 8192 32768 --data random structured uniform_peaked --out "$OUT/bench_a.json" 2>&1 | tee "$OUT/bench_a.log" | grep -v "^|"
echo "bench a: $(( $(date +%s) - t0 )) s"
timeout 110 $B --lengths 131072 --data structured random --out "$OUT/bench_b.json" 2>&1 | tee "$OUT/bench_b.log" | grep -v "^|"
echo "bench b: $(( $(date +%s) - t0 )) s"
grep -h "^|" "$OUT/bench_a.log" ; grep -h "^| [0-9]" "$OUT/bench_b.log"
