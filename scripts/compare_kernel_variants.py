"""A/B one pass of the SALE CUDA kernel on the GPU: build each given variant of kernels/csrc/sale_quant.cu,
sale_select.cu or sale_compute.cu as its own extension (the other sources from this checkout; builds run in
parallel processes), then time that pass alone, on the same inputs, against the checkout's build.

Inputs: `sale bench-op`'s structured data (Llama-3.1-8B shapes, bf16), int8 estimate (per_token steps, as
bench-op, or --group per_block), 64 sink tokens, 128-token window. `--stage quant`: a variant's six outputs must
equal the checkout's bit for bit (the count of differing elements is printed). `--stage select`: the quantized Q/K
come from the checkout; a variant's bitmaps must equal the checkout's bit for bit (the count of differing 32-bit
words is printed). `--stage compute`: bitmaps from the checkout's selection at each tau; prints the largest output
difference from the checkout and TFLOP/s over the computed 64x32 block pairs. Device machine only (needs CUDA and
nvcc); sm_90a builds, as the backend makes for an H100. A variant file may #include another file of its own
directory (e.g. one source with #if switches).

    python3 scripts/compare_kernel_variants.py --stage select v1.cu v2.cu --lengths 32768,131072 --taus 0.008
e.g. with a variant from git: git show 8655159:kernels/csrc/sale_compute.cu > /tmp/v_mma_sync.cu
"""

import argparse
import multiprocessing
import os
import shutil

import torch
from torch.utils.cpp_extension import load

from sale_cli.data.synthetic_qkv import make_inputs
from sale_cli.eval.bench_op import median_ms
from sale_cli.kernels import cuda_backend

SOURCES = ("binding.cpp", "sale_quant.cu", "sale_select.cu", "sale_compute.cu")


def build_variant(stage: str, path: str):
    """Build (or load, once built) the extension with `path` as the stage's source; returns (name, module)."""
    name = os.path.basename(path).removesuffix(".cu")
    src = os.path.join(os.path.dirname(cuda_backend.__file__), "csrc")
    tmp = f"/tmp/sale_variant_{name}"
    if not os.path.exists(os.path.join(tmp, ".copied")):
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.copy(path, os.path.join(tmp, f"sale_{stage}.cu"))
        open(os.path.join(tmp, ".copied"), "w").close()
    return name, load(name=f"sale_variant_{name}", sources=[os.path.join(tmp, s) for s in SOURCES],
                      extra_include_paths=[tmp, os.path.dirname(os.path.abspath(path))], extra_cflags=["-O3"],
                      extra_cuda_cflags=["-O3", "-lineinfo", "-gencode=arch=compute_90a,code=sm_90a"])


def _prebuild(args):
    build_variant(*args)




def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="variant source files of the stage")
    ap.add_argument("--stage", choices=("quant", "select", "compute"), required=True)
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--taus", default="0,0.008", help="comma-separated tau values (every head)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--group", choices=("per_token", "per_block"), default="per_token", help="quantization steps")
    args = ap.parse_args()
    base = cuda_backend._load()
    with multiprocessing.get_context("spawn").Pool(min(len(args.variants), 8)) as pool:
        pool.map(_prebuild, [(args.stage, path) for path in args.variants])
    mods = {"checkout": base}
    for path in args.variants:
        name, mod = build_variant(args.stage, path)
        mods[name] = mod
    scale = 128 ** -0.5
    for length in (int(x) for x in args.lengths.split(",")):
        q, k, v = make_inputs("structured", length, 32, 8, 128, torch.bfloat16, seed=length)
        if args.stage == "quant":
            qargs = (q, k, args.group == "per_block", 8, scale)
            ref = base.quantize(*qargs)
            for name, mod in mods.items():
                out = mod.quantize(*qargs)
                diff = sum(int((x != y).sum()) for x, y in zip(out, ref, strict=True))
                ms = median_ms(lambda m=mod, a=qargs: m.quantize(*a), args.reps, warmup=2)
                print(f"L={length} {name:16s} quant {ms:8.2f} ms  differing elements vs checkout = {diff}", flush=True)
            continue
        for tau_value in (float(x) for x in args.taus.split(",")):
            tau = torch.full((32,), tau_value, device="cuda")
            kint, sk, qint, sq, qm, qkm = base.quantize(q, k, args.group == "per_block", 8, scale)
            sel = (q, k, qint, sq, kint, sk, qm, qkm, tau, scale, 64, 128)
            bits, pairs = base.select(*sel)
            density = pairs.double().sum().item() / (32 * ((length + 63) // 64) * ((length + 31) // 32) / 2)
            if args.stage == "select":
                for name, mod in mods.items():
                    vbits, _ = mod.select(*sel)
                    words = (vbits != bits).sum().item()
                    ms = median_ms(lambda m=mod, a=sel: m.select(*a), args.reps, warmup=2)
                    print(f"L={length} tau={tau_value} density~{density:.3f} {name:16s} select {ms:8.2f} ms  "
                          f"differing words vs checkout = {words}", flush=True)
                continue
            del kint, sk, qint, sq, qm, qkm
            flops = 4 * pairs.double().sum().item() * 64 * 32 * 128
            ref = base.compute(q, k, v, bits, scale, False)[0].float()
            for name, mod in mods.items():
                diff = (mod.compute(q, k, v, bits, scale, False)[0].float() - ref).abs().max().item()
                ms = median_ms(lambda m=mod, a=(q, k, v, bits): m.compute(*a, scale, False), args.reps, warmup=2)
                print(f"L={length} tau={tau_value} {name:16s} compute {ms:8.2f} ms {flops / ms / 1e9:7.1f} TFLOP/s  "
                      f"max |diff| vs checkout = {diff:.3g}", flush=True)


if __name__ == "__main__":
    main()
