#!/usr/bin/env bash
# Device calls of issues 18 and 20 (H200). STAGE=bench: install, build, the bench-op grid at 32K/64K/128K (taus 0,
# 0.2, 0.008; stage split) and a tau sweep at 128K for the break-even density. STAGE=calib: the demo model's 8K
# calibration with held-out checks (scripts/calibration_heldout.py). The demo model's GGUF travels in two halves
# (.carry_a, .carry_b: it exceeds one call's carry) and is put together here; gguf travels as a wheel (.whl).
source "$(dirname "$0")/device_setup.sh"
python3 -c "from sale_cli.kernels import cuda_backend as c; print('cuda backend:', c.available())" 2>&1 | tail -2
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader; stamp build
BENCH="sale bench-op --estimates int8 --computes cuda --sdpa cudnn --granularities none --reps 3 --warmup 1"
case "${STAGE:-bench}" in
bench)
  timeout 240 $BENCH --lengths 32768,65536,131072 --taus 0.2,0.008 --out "$OUT/bench_grid.json" 2>&1 \
    | tee "$OUT/bench_grid.log" | grep -E "^\|" | tail -40; stamp grid
  timeout 160 $BENCH --lengths 131072 --data structured,random --taus 0.0001,0.0003,0.001,0.003,0.03 \
    --out "$OUT/bench_sweep.json" 2>&1 | tee "$OUT/bench_sweep.log" | grep -E "^\|" | tail -30; stamp sweep
  timeout 120 python3 scripts/dense_heads_check.py --out "$OUT/dense_heads.json" 2>&1 | tail -12; stamp dense_heads ;;
calib)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  export SALE_CACHE=/tmp/salecache; d=$SALE_CACHE/SmolLM2-135M-Instruct; mkdir -p $d
  cat .carry_a/* .carry_b/* > $d/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $d/SmolLM2-135M-Instruct.Q4_1.gguf" \
    | sha256sum -c || exit 1
  timeout ${CALIB_TIMEOUT:-480} python3 scripts/calibration_heldout.py --out "$OUT/calib" --device cuda ${CALIB_ARGS:-} 2>&1 \
    | tee "$OUT/calib.log" | grep -v "^\s*$" | tail -150; stamp calib ;;
esac
