#!/usr/bin/env bash
# A/B variants of the selection kernel on the device machine (H200): build each variant in bench_variants/ (a copy
# of kernels/csrc/sale_select.cu, usually with #define switches prepended; the file must travel, so leave the folder
# untracked and not ignored), time it against the checkout's build on bench-op's structured inputs at LENGTHS and
# TAUS (block maps compared word for word), run the GPU tests (TEST_FILES, default the kernel tests) and profile
# the checkout's selection with ncu (NCU=1: pipe utilisation, shared-memory wavefronts, stall reasons).
# Each step can be switched off: VARIANTS=0, TESTS=0, NCU=0. The issue-18 switches (SALE_SEL_*) are in the
# sources of commits 4d5d86b and ea0790a, the warp-specialized kernels' (SALE_SEL_NC, _RR, _PP, ...) in 3dfe6da and
# 9b2db10; docs/history/PERF_KERNEL_NOTES.md has what each measured.
#   NCU=0 TAUS=0.9,0.2,0.003,0.0003 TEST_FILES=tests/ bash scripts/device_select_variants.sh
source "$(dirname "$0")/device_setup.sh"
python3 -c "from sale_cli.kernels import cuda_backend as c; print('cuda backend:', c.available())" 2>&1 | tail -2
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader; stamp build
if [ "${VARIANTS:-1}" = 1 ]; then
timeout 330 python3 scripts/compare_kernel_variants.py --stage select bench_variants/*.cu --lengths ${LENGTHS:-131072} \
  --taus ${TAUS:-0.9,0.2,0.003,0.001,0.0003} --reps 5 2>&1 | tee "$OUT/variants.log" | grep -E "^L=|Error|error" ; stamp variants
fi
if [ "${TESTS:-1}" = 1 ]; then
timeout 330 python3 -m pytest -q -p no:cacheprovider -m gpu ${TEST_FILES:-tests/test_cuda_kernel.py} 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|Error" | tail -20; stamp tests
fi
if [ "${NCU:-1}" = 1 ]; then
timeout 120 ncu --clock-control none -k regex:sale_select_kernel -c 1 --section SpeedOfLight --section ComputeWorkloadAnalysis \
  --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats \
  python3 scripts/profile_kernels.py --length 32768 --tau 0.2 > "$OUT/ncu.txt" 2>&1
grep -E "Duration|Throughput|Pipe|Issue|Warp Cycles|Occupancy|Registers|highest-utilized|stall" "$OUT/ncu.txt" | head -40
timeout 120 ncu --clock-control none -k regex:sale_select_kernel -c 1 --metrics \
  "regex:^sm__pipe_.*cycles_active.avg.pct_of_peak_sustained_active$,regex:^smsp__average_warps_issue_stalled_.*_per_issue_active.ratio$,regex:^l1tex__data_pipe_lsu_wavefronts_mem_shared.*pct_of_peak_sustained_elapsed$,regex:^sm__inst_executed_pipe_.*sum$" \
  python3 scripts/profile_kernels.py --length 32768 --tau 0.2 > "$OUT/ncu_metrics.txt" 2>&1
grep -vE "^==|^\[|^L=" "$OUT/ncu_metrics.txt" | awk '$NF != "0" && $NF != "0.00"' | head -80; stamp ncu
fi
