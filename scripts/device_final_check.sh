#!/usr/bin/env bash
# The closing device calls of a session (H200), in two halves because the demo model's GGUF travels in two:
#   STAGE=tests  (carry .carry_a): keep the GGUF's first half in /tmp/keep; install, build; every GPU-marked
#                test; compute-sanitizer memcheck and racecheck on scripts/sanitize_case.py.
#   STAGE=runs   (carry .carry_b and .whl, the next call while the machine is warm): the demo model's 8K
#                calibration with held-out checks, without and with the dense-heads rule; bench-op at 32K/64K/128K
#                (taus 0.2, 0.008) and the high-density rows for the break-even at 32K and 64K.
source "$(dirname "$0")/device_setup.sh"
[ -d .carry_a ] && { mkdir -p /tmp/keep && cp .carry_a/* /tmp/keep/; }
python3 -c "from sale_cli.kernels import cuda_backend as c; print('cuda backend:', c.available())" 2>&1 | tail -2
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader; stamp build
case "${STAGE:-tests}" in
tests)
  timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -p no:cacheprovider -W ignore::UserWarning -m gpu tests/ 2>&1 \
    | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|Error" | tail -30; stamp gpu_tests
  CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  timeout 150 "$CS" --tool memcheck --error-exitcode 9 python3 scripts/sanitize_case.py 2>&1 | tee "$OUT/memcheck.log" | tail -3
  timeout 120 "$CS" --tool racecheck --error-exitcode 9 python3 scripts/sanitize_case.py --racecheck 2>&1 | tee "$OUT/racecheck.log" | tail -3
  stamp sanitize ;;
runs)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  export SALE_CACHE=/tmp/salecache; d=$SALE_CACHE/SmolLM2-135M-Instruct; mkdir -p $d
  cat /tmp/keep/* .carry_b/* > $d/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $d/SmolLM2-135M-Instruct.Q4_1.gguf" \
    | sha256sum -c || exit 1
  C="python3 scripts/calibration_heldout.py --device cuda"
  timeout 200 $C --out /tmp/calib_norule --variants old,new3,new6 --dense-above 1 2>&1 | tee "$OUT/calib_norule.log" \
    | grep -E "│|passkey|samples, margin" | tail -60
  timeout 120 $C --out /tmp/calib_rule --variants new3 2>&1 | tee "$OUT/calib_rule.log" | grep -E "│|passkey|margin" | tail -20
  tar -czf "$OUT/calib.tgz" -C /tmp calib_norule calib_rule; stamp calib
  BENCH="sale bench-op --estimates int8 --computes cuda --sdpa cudnn --granularities none --reps 3 --warmup 1"
  timeout 150 $BENCH --lengths 32768,65536,131072 --taus 0.2,0.008 --out "$OUT/bench_grid.json" 2>&1 \
    | tee "$OUT/bench_grid.log" | grep -E "^\| [0-9]" | tail -20; stamp grid
  timeout 100 $BENCH --lengths 32768,65536 --data structured,random --taus 0.001,0.0003 --out "$OUT/bench_sweep.json" \
    2>&1 | tee "$OUT/bench_sweep.log" | grep -E "^\| [0-9]" | tail -20; stamp sweep
  python3 scripts/break_even.py "$OUT/bench_grid.json" "$OUT/bench_sweep.json" ;;
esac
