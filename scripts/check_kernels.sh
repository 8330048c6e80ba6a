#!/usr/bin/env bash
# Compile-check every SALE .cu for sm_80, sm_89 and sm_90a with nvcc (no GPU needed) and print the
# ptxas resource usage (registers, shared memory, stack frame, spills) of every kernel.
# Fails on any compile error, or on local-memory spills unless ALLOW_SPILLS=1.
set -euo pipefail
cd "$(dirname "$0")/../kernels/csrc"
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "kernels-check SKIPPED: nvcc not found (set NVCC=/path/to/nvcc); nothing was compiled" >&2
  exit 0
fi
ARCHS=${ARCHS:-"compute_80,code=sm_80 compute_89,code=sm_89 compute_90a,code=sm_90a"}
status=0
for arch in $ARCHS; do
  for f in *.cu; do
    log=$(mktemp)
    if ! "$NVCC" -c -o /dev/null -std=c++17 -O3 -lineinfo -gencode=arch=$arch -Xptxas -v "$f" >"$log" 2>&1; then
      echo "FAIL $f [$arch]"; cat "$log"; status=1; rm -f "$log"; continue
    fi
    echo "== $f [$arch]"
    # one line per kernel: demangled-ish name, registers, smem, stack, spills
    python3 - "$log" <<'PY'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
name = None; stack = None
for ln in lines:
    m = re.search(r"Compiling entry function '([^']+)'", ln)
    if m:
        name = m.group(1); continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ln)
    if m:
        stack = m.groups(); continue
    m = re.search(r"Used (\d+) registers.*", ln)
    if m and name:
        short = re.sub(r"^_ZN4sale\d*", "", name)[:60]
        print(f"  {short:<60} regs={m.group(1):>3} stack={stack[0]} spill_st={stack[1]} spill_ld={stack[2]}  [{ln.split('registers')[-1].strip(', ')}]")
        if int(stack[1]) or int(stack[2]):
            print("  WARNING: local-memory spills")
PY
    if grep -Eq "[1-9][0-9]* bytes spill (stores|loads)" "$log" && [ "${ALLOW_SPILLS:-0}" != 1 ]; then status=1; fi
    if grep -qi "warning" "$log"; then grep -i warning "$log"; fi
    rm -f "$log"
  done
done
exit $status
