"""What int8 tensor-core throughput a Hopper GPU sustains, next to what the SALE selection needs (issue 18).

Measures, each with the SM clock and board power that nvidia-smi reports while it runs:
- `wgmma`: a kernel that only issues int8 wgmma m64nNk32 chains over D = 128 from shared memory (both operands,
  128-byte swizzle, as the selection pass does; N = 64 is the selection's shape), two accumulator sets in flight
  per warpgroup, no loads, no tests: the ceiling of that instruction at the clock the GPU holds under it;
- `cublas`: torch._int_mm (cuBLAS / cuBLASLt int8 GEMM), and for comparison fp8 (torch._scaled_mm) and bf16 GEMMs;
- `select`: this checkout's selection pass at 128K on bench-op's structured inputs (Llama-3.1-8B shapes) at TAUS,
  and cuDNN SDPA on the same inputs.
Each rate is also turned into the time the selection's int8 estimate would take at that rate (its multiply-adds
counted from the candidate key blocks of every query block, as the kernel issues them).

    python3 scripts/int8_roofline.py --json results/benchmarks/roofline.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import threading
import time

import torch
from torch.utils.cpp_extension import load_inline

from sale_cli.data.synthetic_qkv import make_inputs
from sale_cli.eval.bench_op import _sdpa_call, causal_flops, median_ms
from sale_cli.kernels import cuda_backend
from sale_cli.kernels.reference import _block_ranges, visible_block_pairs


def _wgmma_asm(n: int) -> str:
    """`mma<n>`: d (n / 2 registers) += A(64 x 32 s8) * B(n x 32 s8), both from shared memory."""
    regs = n // 2
    outs = ",".join(f"%{i}" for i in range(regs))
    cons = ", ".join(f'"+r"(d[{i}])' for i in range(regs))
    return f"""
template <> __device__ __forceinline__ void mma<{n}>(int (&d)[{regs}], uint64_t da, uint64_t db) {{
  asm volatile("wgmma.mma_async.sync.aligned.m64n{n}k32.s32.s8.s8 {{{outs}}}, %{regs}, %{regs + 1}, 1;\\n"
               : {cons} : "l"(da), "l"(db));
}}
"""


def _source() -> str:
    body = "".join(_wgmma_asm(n) for n in (64, 128, 256))
    return (
        r"""
#include <torch/extension.h>
#include <cuda_runtime.h>
#include <stdint.h>

__device__ __forceinline__ uint64_t desc_sw128(uint32_t saddr) {  // LBO 16, SBO 1024, 128-byte swizzle
  return (uint64_t)((saddr & 0x3FFFFu) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}
template <int N> __device__ __forceinline__ void mma(int (&d)[N / 2], uint64_t da, uint64_t db);
"""
        + body
        + r"""
// Per CTA (one warpgroup): 4 A tiles (64 rows x 128 int8, "heads") and one B tile (N rows x 128 int8) in shared
// memory; per iteration, for each head a chain of 4 k-steps into one of two accumulator sets (one for N = 256), at
// most two chains in flight (the selection's pattern). The accumulators are summed into out so that nothing is dead code.
template <int N, int OCC>
__global__ void __launch_bounds__(128, OCC) wgmma_loop(const int4* src, int* out, int iters) {
  extern __shared__ __align__(1024) unsigned char smem[];
  constexpr int A_BYTES = 4 * 64 * 128, B_BYTES = N * 128;
  for (int i = threadIdx.x; i < (A_BYTES + B_BYTES) / 16; i += 128)
    reinterpret_cast<int4*>(smem)[i] = src[(blockIdx.x * 977 + i) % (1 << 16)];
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  const uint32_t sa = (uint32_t)__cvta_generic_to_shared(smem);
  const uint64_t da = desc_sw128(sa), db = desc_sw128(sa + A_BYTES);
  constexpr int SETS = N <= 128 ? 2 : 1;  // two sets of 128 registers would not fit
  int acc[SETS][N / 2];
#pragma unroll
  for (int s = 0; s < SETS; ++s)
#pragma unroll
    for (int r = 0; r < N / 2; ++r) acc[s][r] = 0;
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) mma<N>(acc[h % SETS], da + (h * 64 * 128 + kk * 32) / 16, db + kk * 2);
      asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
    }
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  int s = 0;
#pragma unroll
  for (int r = 0; r < N / 2; ++r)
#pragma unroll
    for (int t = 0; t < SETS; ++t) s += acc[t][r];
  out[blockIdx.x * 128 + threadIdx.x] = s;
}

// Runs the loop with `ctas` CTAs; returns nothing (timed by the caller with CUDA events).
void run(torch::Tensor src, torch::Tensor out, int64_t n, int64_t occ, int64_t ctas, int64_t iters) {
  const int smem = 4 * 64 * 128 + (int)n * 128;
  auto go = [&](auto kernel) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    kernel<<<(int)ctas, 128, smem>>>(reinterpret_cast<const int4*>(src.data_ptr()), out.data_ptr<int>(), (int)iters);
  };
  if (n == 64 && occ == 3) go(wgmma_loop<64, 3>);
  else if (n == 64 && occ == 1) go(wgmma_loop<64, 1>);
  else if (n == 128) go(wgmma_loop<128, 1>);
  else if (n == 256) go(wgmma_loop<256, 1>);
  else TORCH_CHECK(false, "unsupported n / occ");
  TORCH_CHECK(cudaGetLastError() == cudaSuccess, "launch failed");
}
"""
    )


class ClockSampler:
    """nvidia-smi samples (SM MHz, board W) every 20 ms in the background; `window(t0, t1)` averages them."""

    def __init__(self):
        self.samples: list[tuple[float, float, float]] = []
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "20"],
            stdout=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                mhz, watts = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.monotonic(), mhz, watts))

    def window(self, t0: float, t1: float) -> tuple[float, float]:
        inside = [(m, w) for t, m, w in self.samples if t0 <= t <= t1]
        if not inside:
            return float("nan"), float("nan")
        return statistics.mean(m for m, _ in inside), statistics.mean(w for _, w in inside)

    def close(self):
        self.proc.terminate()


def timed(sampler: ClockSampler, fn, reps: int, seconds: float = 1.5) -> dict:
    """Median ms of fn, then fn repeated for about `seconds` under the clock sampler (clock and power of that
    stretch)."""
    ms = median_ms(fn, reps, warmup=2)
    n = max(3, int(seconds * 1000 / max(ms, 1e-3)))
    torch.cuda.synchronize()
    t0 = time.monotonic()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    t1 = time.monotonic()
    mhz, watts = sampler.window(t0 + 0.2, t1)
    return {"ms": ms, "mhz": mhz, "watts": watts}


def selection_macs(length: int, heads: int, d: int = 128, sink_tokens: int = 64, window: int = 128) -> int:
    """Multiply-adds the selection's int8 estimate issues for a whole causal prefill: per 64-row query block, its
    candidate key blocks (visible, outside R) in 64-key tiles of 64 rows each, as the kernel issues them."""
    visible, in_r = _block_ranges(length, length, 64, 32, sink_tokens, window)
    candidates = (visible & ~in_r).sum(dim=1)
    return int(((candidates + 1) // 2).sum()) * 64 * 64 * d * heads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--taus", default="20,0.9,0.2,0.003")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.cuda.get_device_properties(0)
    sms = dev.multi_processor_count
    sampler = ClockSampler()
    time.sleep(0.5)
    rows: list[dict] = []
    macs_sel = selection_macs(args.length, 32)

    def add(kind: str, name: str, ops: float, r: dict):
        tops = ops / r["ms"] / 1e9
        row = dict(
            kind=kind, name=name, ops=ops, tops=tops, selection_ms_at_rate=2 * macs_sel / tops / 1e9, **r
        )
        rows.append(row)
        print(
            f"{kind:7s} {name:34s} {r['ms']:9.2f} ms {tops:8.1f} TOPS  SM {r['mhz']:6.0f} MHz {r['watts']:6.0f} W"
            f"  selection's int8 MACs at this rate: {row['selection_ms_at_rate']:6.1f} ms",
            flush=True,
        )

    # 1. the wgmma ceiling per shape
    mod = load_inline(
        "sale_int8_roofline",
        cpp_sources="void run(torch::Tensor, torch::Tensor, int64_t, int64_t, int64_t, int64_t);",
        cuda_sources=_source(),
        functions=["run"],
        extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a"],
        verbose=False,
    )
    src = torch.randint(-127, 128, (1 << 20,), dtype=torch.int8, device="cuda")
    for n, occ in ((64, 3), (64, 1), (128, 1), (256, 1)):
        ctas, iters = sms * occ * 4, 2048 * 64 // n
        out = torch.empty(ctas * 128, dtype=torch.int32, device="cuda")
        ops = 2.0 * ctas * iters * 4 * 4 * 64 * n * 32
        r = timed(
            sampler,
            lambda n=n, occ=occ, ctas=ctas, iters=iters, out=out: mod.run(src, out, n, occ, ctas, iters),
            args.reps,
        )
        add("wgmma", f"m64n{n}k32 s8 SS, {occ} CTA/SM", ops, r)

    # 2. library GEMMs (b column-major, as cuBLAS's int8 and fp8 paths want)
    for size in (8192, 16384):
        a = torch.randint(-127, 128, (size, size), dtype=torch.int8, device="cuda")
        b = torch.randint(-127, 128, (size, size), dtype=torch.int8, device="cuda").t()
        one = torch.ones((), device="cuda")
        gemms = {
            "int8 _int_mm": (a, b, torch._int_mm),
            "fp8 _scaled_mm": (
                a.to(torch.float8_e4m3fn),
                b.t().contiguous().to(torch.float8_e4m3fn).t(),
                lambda x, y, one=one: torch._scaled_mm(x, y, one, one, out_dtype=torch.bfloat16),
            ),
            "bf16 matmul": (a.to(torch.bfloat16), b.to(torch.bfloat16), torch.matmul),
        }
        for name, (x, y, op) in gemms.items():
            try:
                r = timed(sampler, lambda x=x, y=y, op=op: op(x, y), args.reps)
            except RuntimeError as e:  # a GEMM this torch build lacks: say so, keep going
                print(f"cublas  {name} {size}^3: {str(e).splitlines()[0]}")
                continue
            add("cublas", f"{name} {size}^3", 2.0 * size**3, r)
        del a, b, gemms

    # 3. the selection pass and cuDNN on bench-op's structured inputs
    base = cuda_backend._load()
    scale = 128**-0.5
    q, k, v = make_inputs("structured", args.length, 32, 8, 128, torch.bfloat16, seed=args.length)
    kint, sk, qint, sq, qm, qkm = base.quantize(q, k, False, 8, scale)
    for tau_value in (float(x) for x in args.taus.split(",")):
        tau = torch.full((32,), tau_value, device="cuda")
        sel = (q, k, qint, sq, kint, sk, qm, qkm, tau, scale, 64, 128)
        _, pairs = base.select(*sel)
        density = pairs.double().sum().item() / (32 * visible_block_pairs(args.length, args.length, 64, 32))
        r = timed(sampler, lambda sel=sel: base.select(*sel), args.reps)
        add("select", f"tau {tau_value:g}, density {density:.3f}", 2.0 * macs_sel, r)
    del kint, sk, qint, sq, qm, qkm
    cudnn, _ = _sdpa_call("cudnn", [(q, k, v)])  # bench-op's cuDNN call, with its GQA handling
    add("cudnn", "SDPA causal bf16", causal_flops(args.length, 32, 128), timed(sampler, lambda: cudnn(0), 3))
    sampler.close()
    print(
        f"selection int8 MACs at L={args.length}: {macs_sel:.4g} ({2 * macs_sel:.4g} ops); GPU {dev.name}, {sms} SMs"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(gpu=dev.name, sms=sms, length=args.length, selection_macs=macs_sel, rows=rows),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
