#!/usr/bin/env bash
# One device call: build the SALE CUDA extension, run its tests, run the kernel benchmark.
# Usage (repo root, on the GPU machine): OUT=/some/dir bash scripts/device_cuda_kernel.sh [lengths...]
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
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernel.py 2>&1 | tee "$OUT/test.log" | tail -60
LENS=${*:-8192 32768 131072}
timeout 280 python3 -m sale_cli.kernels.bench_kernel --lengths $LENS --reps 5 --out "$OUT/bench_kernel.json" 2>&1 | tee "$OUT/bench.log" | tail -40
