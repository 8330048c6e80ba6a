#!/usr/bin/env bash
# Issue 18 closing device call (H200), on the checkout's defaults: the kernel tests, compute-sanitizer memcheck and
# racecheck, the bench-op grid (32K/64K/128K, taus 0.2 / 0.008, stage split), the 128K density sweep and the
# high-density rows at 32K/64K that the break-even density needs.
set -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=16
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$(date +%s); stamp() { echo "== $1: $(( $(date +%s) - t0 )) s"; }
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 -c "from sale_cli.kernels import cuda_backend as c; print('cuda backend:', c.available())" 2>&1 | tail -2
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader; stamp build
if [ "${TESTS:-1}" = 1 ]; then
  timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_kernel.py tests/test_cuda_dense_heads.py 2>&1 \
    | tail -3; stamp tests
  CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  timeout 150 "$CS" --tool memcheck --error-exitcode 9 python3 scripts/sanitize_case.py 2>&1 | tee "$OUT/memcheck.log" | tail -2
  timeout 120 "$CS" --tool racecheck --error-exitcode 9 python3 scripts/sanitize_case.py --racecheck 2>&1 | tee "$OUT/racecheck.log" | tail -2
  stamp sanitize
fi
BENCH="sale bench-op --estimates int8 --computes cuda --sdpa cudnn --granularities none --reps 3 --warmup 1"
timeout 170 $BENCH --lengths 32768,65536,131072 --taus 0.2,0.008 --out "$OUT/bench_grid.json" 2>&1 \
  | tee "$OUT/bench_grid.log" | grep -E "^\| [0-9]" | tail -20; stamp grid
timeout 150 $BENCH --lengths 131072 --taus 0.9,0.003,0.001,0.0003 --out "$OUT/bench_sweep_128k.json" 2>&1 \
  | tee "$OUT/bench_sweep_128k.log" | grep -E "^\| [0-9]" | tail -20; stamp sweep128
timeout 100 $BENCH --lengths 32768,65536 --data structured,random --taus 0.001,0.0003 --out "$OUT/bench_sweep.json" \
  2>&1 | tee "$OUT/bench_sweep.log" | grep -E "^\| [0-9]" | tail -20; stamp sweep
python3 scripts/break_even.py "$OUT/bench_grid.json" "$OUT/bench_sweep_128k.json" "$OUT/bench_sweep.json"
