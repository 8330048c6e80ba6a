#!/usr/bin/env bash
# One device call for chunked prefill (Lq < Lk) in the CUDA kernels (H200, under 8 minutes): install the checkout,
# build the extension (and, in the background, the kernels/csrc of BASE, default the commit before the offset
# work, when git can see it), run the GPU tests of both kernel test files, then scripts/chunk_timing.py: base vs
# this checkout at Lq == Lk (bit-identical, stage times) and whole vs chunked prefill at 128K.
# Usage (repo root, on the GPU machine): OUT=/some/dir bash scripts/device_chunk_check.sh
# (BASE=<rev> for another base commit, or BASE_CSRC=<dir> for a kernels/csrc tree where git is absent;
# STAGES="tests" or "timing" for one half; TEST_ARGS / TIMING_ARGS passed on)
source "$(dirname "$0")/device_setup.sh"
BASE=${BASE:-5c18bec}
STAGES=${STAGES:-tests timing}
has() { [[ " $STAGES " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader
BASE_DIR=""
if [ -n "${BASE_CSRC:-}" ] && [ -d "$BASE_CSRC" ]; then  # a kernels/csrc tree carried in by hand
  BASE_DIR=$BASE_CSRC
elif git rev-parse -q --verify "$BASE^{commit}" >/dev/null 2>&1; then
  BASE_DIR=/tmp/sale_base_csrc; rm -rf "$BASE_DIR"; mkdir -p "$BASE_DIR"
  git archive "$BASE" kernels/csrc | tar -x -C "$BASE_DIR" --strip-components=2
else
  echo "git cannot see $BASE and no BASE_CSRC: the Lq == Lk comparison with the base commit is skipped"
fi
if [ -n "$BASE_DIR" ] && has timing; then
  # build it alongside the tests (CPU work; torch caches it for chunk_timing.py)
  (python3 -c "import sys; sys.path.insert(0, 'scripts'); import chunk_timing as c; c.load_base('$BASE_DIR')" \
    >"$OUT/base_build.log" 2>&1 || echo "base build failed (see base_build.log)") &
  BUILD_PID=$!
fi
python3 -c "from sale_cli.kernels import cuda_backend as c; print('available:', c.available())" 2>&1 | tail -3
stamp build
if has tests; then
  timeout ${TEST_TIMEOUT:-360} python3 -m pytest -q -s -p no:cacheprovider -W ignore::UserWarning -m gpu \
    tests/test_cuda_kernel.py tests/test_cuda_chunks.py ${TEST_ARGS:-} 2>&1 \
    | tee "$OUT/tests.log" | grep -E "passed|failed|error|differing|chunk maps|bit-identical|FAIL|Error" | tail -60
  stamp tests
fi
if has timing; then
  [ -n "${BUILD_PID:-}" ] && wait "$BUILD_PID"
  timeout ${TIMING_TIMEOUT:-120} python3 scripts/chunk_timing.py ${BASE_DIR:+--base "$BASE_DIR"} ${TIMING_ARGS:-} 2>&1 \
    | tee "$OUT/chunk_timing.log" | grep -v "^\s*$"
  stamp timing
fi
