#!/usr/bin/env bash
# Issue 18's floor on the device machine (H200): the int8 tensor-core rate the GPU sustains (a wgmma-only kernel
# per shape, cuBLAS int8 / fp8 / bf16 GEMMs), the SM clock and power under each and under the selection pass
# (scripts/int8_roofline.py), then bench-op at 128K at the lowest densities the structured inputs reach.
#   OUT=$OUT bash scripts/device_roofline.sh
source "$(dirname "$0")/device_setup.sh"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit,power.max_limit,memory.used --format=csv
python3 -c "from sale_cli.kernels import cuda_backend as c; print('cuda backend:', c.available())" 2>&1 | tail -2
stamp build
timeout 300 python3 scripts/int8_roofline.py --json "$OUT/roofline.json" 2>&1 | tee "$OUT/roofline.log" \
  | grep -vE "^\s*$" | tail -30; stamp roofline
timeout 150 sale bench-op --estimates int8 --computes cuda --sdpa cudnn --granularities none --reps 3 --warmup 1 \
  --lengths 131072 --taus ${LOW_TAUS:-20,0.9} --out "$OUT/bench_low.json" 2>&1 | tee "$OUT/bench_low.log" \
  | grep -E "^\|" | tail -12; stamp bench
