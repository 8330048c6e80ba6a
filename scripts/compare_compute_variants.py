"""A/B the computation pass on the GPU: build each given variant of kernels/csrc/sale_compute.cu as its own
extension (the other sources from this checkout), then time the compute op alone, on the same inputs and bitmaps,
against the checkout's build, and print the largest output difference from it.

Inputs: `sale bench-op`'s structured data (Llama-3.1-8B shapes, bf16), bitmaps from the checkout's selection pass
at tau 0 (dense causal) and 0.008 (int8, per_block, 64 sink tokens, 128-token window). TFLOP/s counts the computed
64x32 block pairs. Device machine only (needs CUDA and nvcc); sm_90a builds, as the backend makes for an H100.

    python3 scripts/compare_compute_variants.py old_compute.cu [...] --lengths 32768,131072
e.g. with a variant from git: git show 8655159:kernels/csrc/sale_compute.cu > /tmp/v_mma_sync.cu
"""

import argparse
import os
import shutil
import statistics

import torch
from torch.utils.cpp_extension import load

from sale_cli.eval.bench_op import make_inputs
from sale_cli.kernels import cuda_backend

SOURCES = ("binding.cpp", "sale_quant.cu", "sale_select.cu", "sale_compute.cu")


def build_variant(path: str):
    name = os.path.basename(path).removesuffix(".cu")
    src = os.path.join(os.path.dirname(cuda_backend.__file__), "csrc")
    tmp = f"/tmp/sale_variant_{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.copy(path, os.path.join(tmp, "sale_compute.cu"))
    return name, load(name=f"sale_variant_{name}", sources=[os.path.join(tmp, s) for s in SOURCES],
                      extra_include_paths=[tmp], extra_cflags=["-O3"],
                      extra_cuda_cflags=["-O3", "-lineinfo", "-gencode=arch=compute_90a,code=sm_90a"])


def median_ms(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="variant sale_compute.cu files")
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    base = cuda_backend._load()
    mods = {"checkout": base}
    for path in args.variants:
        name, mod = build_variant(path)
        mods[name] = mod
    scale = 128 ** -0.5
    for length in (int(x) for x in args.lengths.split(",")):
        q, k, v = make_inputs("structured", length, 32, 8, 128, torch.bfloat16, seed=length)
        for tau_value in (0.0, 0.008):
            tau = torch.full((32,), tau_value, device="cuda")
            kint, sk, qint, sq, qm, qkm = base.quantize(q, k, True, 8, scale)
            bits, pairs = base.select(q, k, qint, sq, kint, sk, qm, qkm, tau, scale, 64, 128)
            del kint, sk, qint, sq, qm, qkm
            flops = 4 * pairs.double().sum().item() * 64 * 32 * 128
            ref = base.compute(q, k, v, bits, scale, False)[0].float()
            for name, mod in mods.items():
                diff = (mod.compute(q, k, v, bits, scale, False)[0].float() - ref).abs().max().item()
                ms = median_ms(lambda m=mod, a=(q, k, v, bits): m.compute(*a, scale, False), args.reps)
                print(f"L={length} tau={tau_value} {name:16s} {ms:8.2f} ms {flops / ms / 1e9:7.1f} TFLOP/s  "
                      f"max |diff| vs checkout = {diff:.3g}", flush=True)


if __name__ == "__main__":
    main()
