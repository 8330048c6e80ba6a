#!/usr/bin/env bash
# One device call: build the SALE CUDA extension, run its tests, run the op benchmark (`sale bench-op`, int8
# estimate and our compute pass only, against cuDNN and flash SDPA on the same data).
# Usage (repo root, on the GPU machine): OUT=/some/dir bash scripts/device_cuda_kernel.sh
# Options (environment): REPS (default 3); LENGTHS_A / DATA_A (default "8192 32768" / "random structured") and
# LENGTHS_B / DATA_B (default 131072 / "structured random") for the two benchmark runs;
# BASE=dir: also build a baseline (the repo's kernels/ with the files of dir copied over kernels/csrc, own
# extension cache), benchmark it on the same data, and compare the selection bitmaps of both builds word for
# word (MAPS_LENGTHS / MAPS_DATA, default 32768 131072 / structured random); the baseline benchmark runs
# BASE_LENGTHS / BASE_DATA (default 32768 131072 / structured). FALLBACK=1 (with BASE): also build the
# sources for plain sm_90 (the mma.sync path of sm_80/sm_89) and compare its bitmaps as well.
set -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=16
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import pytest" 2>/dev/null || { python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; }
# the device copy is not pip-installed: map sale_cli.kernels -> kernels/ and sale_cli.eval -> eval/ (cwd's sale_cli
# shadows PYTHONPATH)
[ -e sale_cli/kernels ] || ln -s ../kernels sale_cli/kernels
[ -e sale_cli/eval ] || ln -s ../eval sale_cli/eval
REPO=$PWD
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader
t0=$(date +%s)
python3 -c "from sale_cli.kernels import cuda_backend as c; print('available:', c.available())" 2>&1 | tee "$OUT/build.log" | tail -5
echo "build: $(( $(date +%s) - t0 )) s"
timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_cuda_kernel.py 2>&1 | tee "$OUT/test.log" | tail -40 \
  || echo "== tests FAILED (full log: $OUT/test.log)"
echo "tests done: $(( $(date +%s) - t0 )) s"
B="python3 -m sale_cli.cli bench-op --taus 0.004 --reps ${REPS:-3} --estimates int8 --computes cuda --granularities none --sdpa cudnn,flash"
timeout 150 $B --lengths "${LENGTHS_A:-8192 32768}" --data "${DATA_A:-random structured}" --out "$OUT/bench_a.json" 2>&1 | tee "$OUT/bench_a.log" | grep -v "^|"
echo "bench a: $(( $(date +%s) - t0 )) s"
timeout 150 $B --lengths "${LENGTHS_B:-131072}" --data "${DATA_B:-structured random}" --out "$OUT/bench_b.json" 2>&1 | tee "$OUT/bench_b.log" | grep -v "^|"
echo "bench b: $(( $(date +%s) - t0 )) s"

# selection bitmaps of the build imported from the cwd, saved (mode save) or compared word for word (compare)
MAPS=$(cat <<'PY'
import sys, torch
from sale_cli.kernels import cuda_backend as cb
from sale_cli.eval import bench_op
mode, d, lengths, datas = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split()
mod = cb._load()
for L in map(int, lengths):
    for data in datas:
        q, k, v = bench_op.make_inputs(data, L, 32, 8, 128, torch.bfloat16, seed=L)
        tau = torch.full((32,), 0.004, device="cuda")
        scale = 1.0 / 128 ** 0.5
        kint, sk, qint, sq, qm, qkm = mod.quantize(q, k, 0, scale)
        bits, pairs = mod.select(q, k, qint, sq, kint, sk, qm, qkm, tau, scale, 32, 128)
        f = f"{d}/bits_{L}_{data}.pt"
        if mode == "save":
            torch.save(bits.cpu(), f)
        else:
            ref = torch.load(f).to(bits.device)
            diff = int(((ref ^ bits) != 0).sum())
            print(f"maps L={L} {data}: {diff} differing words of {bits.numel()} ({'IDENTICAL' if diff == 0 else 'DIFFERENT'})")
        del q, k, v
        torch.cuda.empty_cache()
PY
)
if [ -n "${BASE:-}" ]; then
  ML=${MAPS_LENGTHS:-32768 131072}; MD=${MAPS_DATA:-structured random}
  mkdir -p /tmp/maps
  timeout 90 python3 -c "$MAPS" save /tmp/maps "$ML" "$MD" 2>&1 | tail -3
  echo "maps saved: $(( $(date +%s) - t0 )) s"
  rm -rf /tmp/basetree && mkdir -p /tmp/basetree && cp -r sale_cli /tmp/basetree/ && rm -f /tmp/basetree/sale_cli/kernels \
    /tmp/basetree/sale_cli/eval && cp -r kernels /tmp/basetree/sale_cli/kernels && cp -r eval /tmp/basetree/sale_cli/eval \
    && cp "$BASE"/* /tmp/basetree/sale_cli/kernels/csrc/
  (
    cd /tmp/basetree && export PYTHONPATH=/tmp/basetree:${PYTHONPATH#$REPO:} TORCH_EXTENSIONS_DIR=/tmp/ext_base
    python3 -c "from sale_cli.kernels import cuda_backend as c; print('baseline available:', c.available(), c.__file__)" 2>&1 | tail -3
    echo "baseline build: $(( $(date +%s) - t0 )) s"
    timeout 90 python3 -c "$MAPS" compare /tmp/maps "$ML" "$MD" 2>&1 | tail -6
    echo "maps compared: $(( $(date +%s) - t0 )) s"
    timeout 150 $B --lengths ${BASE_LENGTHS:-32768 131072} --data ${BASE_DATA:-structured} --out "$OUT/base.json" 2>&1 | tee "$OUT/base.log" | grep -v "^|"
    echo "baseline bench: $(( $(date +%s) - t0 )) s"
  )
fi
if [ "${FALLBACK:-0}" = 1 ] && [ -d /tmp/maps ]; then
  # the mma.sync path (what sm_80/sm_89 run): the same sources built for plain sm_90 (no wgmma), bitmaps
  # compared with the ones saved above
  rm -rf /tmp/fbtree && mkdir -p /tmp/fbtree && cp -r sale_cli /tmp/fbtree/ && rm -f /tmp/fbtree/sale_cli/kernels \
    /tmp/fbtree/sale_cli/eval && cp -r kernels /tmp/fbtree/sale_cli/kernels && cp -r eval /tmp/fbtree/sale_cli/eval \
    && sed -i 's/compute_90a,code=sm_90a/compute_90,code=sm_90/' /tmp/fbtree/sale_cli/kernels/cuda_backend.py
  (
    cd /tmp/fbtree && export PYTHONPATH=/tmp/fbtree:${PYTHONPATH#$REPO:} TORCH_EXTENSIONS_DIR=/tmp/ext_fb
    timeout 120 python3 -c "$MAPS" compare /tmp/maps "${MAPS_LENGTHS:-32768 131072}" "${MAPS_DATA:-structured random}" 2>&1 | tail -6 | sed 's/^/sm_90 (mma.sync) /'
    echo "fallback maps compared: $(( $(date +%s) - t0 )) s"
  )
fi
echo "== new build"
grep -h "^|" "$OUT/bench_a.log" ; grep -h "^| [0-9]" "$OUT/bench_b.log"
if [ -n "${BASE:-}" ]; then echo "== baseline"; grep -h "^| [0-9]" "$OUT/base.log"; fi
