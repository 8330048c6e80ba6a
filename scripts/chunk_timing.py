"""Chunked prefill timing of the SALE CUDA op (device machine only), Llama-3.1-8B shapes of one layer (B 1, Hq 32,
Hkv 8, d 128, bf16, structured data as `sale bench-op`), int8, per_token, sink 32, window 128, compute "cuda".

1. `--base DIR` (a kernels/csrc tree of an older commit, e.g. from `git archive`): that tree's extension against
   this checkout's at Lq == Lk (32K and 128K): bitmaps and outputs must be bit-identical; per-stage medians of
   both (the offset must not slow the whole-prompt call down).
2. sale_attention_cuda on the whole prompt (Lq = Lk = 131072) against chunks of 8192 and 16384 rows over the
   growing prefix (chunk i: rows [c0, c1) over keys [0, c1), as a chunked prefill calls it), summed over the
   chunks; tau 0.2 and 0 on every head. The prefixes are contiguous copies made before timing (a KV cache
   hands the op its own tensors). Prints one table; medians of --reps runs after one warm-up.

    python3 scripts/chunk_timing.py --base /tmp/base_csrc
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from sale_cli.data.synthetic_qkv import make_inputs
from sale_cli.eval.bench_op import median_ms
from sale_cli.kernels import cuda_backend

HQ, HKV, D = 32, 8, 128
OPTS = dict(scale=D ** -0.5, block_q=64, block_k=32, sink_tokens=32, local_window=128, estimate="int8",
            quant_group="per_token", need_block_map=False, need_lse=False, compute="cuda")
SOURCES = ("binding.cpp", "sale_quant.cu", "sale_select.cu", "sale_compute.cu")


def load_base(path: str):
    """The extension built from another kernels/csrc tree (a name of its own, cached by torch)."""
    from torch.utils.cpp_extension import load

    return load(name="sale_base_" + cuda_backend._arch_flag().split("code=")[-1],
                sources=[os.path.join(path, s) for s in SOURCES], extra_include_paths=[path],
                extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo", cuda_backend._arch_flag()])




def run_stages(mod, q, k, v, tau, reps: int):
    """One module's three stages on one input: (quantized tensors, bits, out, lse, (quant, select, compute) ms)."""
    scale = OPTS["scale"]

    def quant():
        return mod.quantize(q, k, False, 8, scale)

    qt = quant()

    def select():
        return mod.select(q, k, qt[2], qt[3], qt[0], qt[1], qt[4], qt[5], tau, scale, 32, 128)

    bits, _ = select()

    def compute():
        return mod.compute(q, k, v, bits, scale, False)

    out, lse = mod.compute(q, k, v, bits, scale, True)
    return qt, bits, out, lse, (median_ms(quant, reps), median_ms(select, reps), median_ms(compute, reps))


def compare_base(base, reps: int) -> bool:
    """Stage by stage, this checkout's module against the base tree's at Lq == Lk; True if all bit-identical."""
    new = cuda_backend._load()
    same_all = True
    print("\n## Lq == Lk: this checkout vs the base tree (stage medians, ms; bit-identical bitmaps and outputs)")
    print("| L | tau | stage | base | new | identical |")
    print("|---|---|---|---|---|---|")
    for length in (32768, 131072):
        q, k, v = make_inputs("structured", length, HQ, HKV, D, torch.bfloat16, seed=length)
        for tau_value in (0.2, 0.0):
            tau = torch.full((HQ,), tau_value, device="cuda")
            old_res = run_stages(base, q, k, v, tau, reps)
            new_res = run_stages(new, q, k, v, tau, reps)
            same = [all(torch.equal(a, b) for a, b in zip(old_res[0], new_res[0], strict=True)),
                    torch.equal(old_res[1], new_res[1]),
                    torch.equal(old_res[2], new_res[2]) and torch.equal(old_res[3], new_res[3])]
            same_all &= all(same)
            for j, stage in enumerate(("quant", "select", "compute")):
                print(f"| {length} | {tau_value} | {stage} | {old_res[4][j]:.2f} | {new_res[4][j]:.2f} | "
                      f"{same[j]} |", flush=True)
            del old_res, new_res
        del q, k, v
        torch.cuda.empty_cache()
    print(f"base vs new at Lq == Lk: {'bit-identical' if same_all else 'DIFFERENT'}")
    return same_all


def chunked_table(length: int, chunks: list[int], reps: int) -> None:
    q, k, v = make_inputs("structured", length, HQ, HKV, D, torch.bfloat16, seed=length)
    print(f"\n## sale_attention_cuda, whole vs chunked prefill, L = {length} (ms, medians of {reps}; stage sums)")
    print("| tau | call | calls | density | total | quant | select | compute | vs whole |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tau_value in (0.2, 0.0):
        tau = torch.full((HQ,), tau_value, device="cuda")
        whole_ms = None
        for size in [length] + chunks:
            bounds = list(range(0, length, size)) + [length]
            parts = [(q[:, :, c0:c1].contiguous(), k[:, :, :c1].contiguous(), v[:, :, :c1].contiguous())
                     for c0, c1 in zip(bounds[:-1], bounds[1:], strict=True)]

            def run(parts=parts, tau=tau, timing=False):
                return [cuda_backend.sale_attention_cuda(*p, tau, **OPTS, timing=timing) for p in parts]

            total = median_ms(run, reps)
            res = run(timing=True)
            stages = {s: sum(r[4][s] for r in res) for s in ("quant", "select", "compute")}
            # density over the whole causal triangle: visible pairs weighted
            vis = [cuda_backend._visible_pairs(p[0].shape[2], p[1].shape[2], 64, 32) for p in parts]
            dens = sum(float(r[3].mean()) * n for r, n in zip(res, vis, strict=True)) / sum(vis)
            whole_ms = total if size == length else whole_ms
            name = "whole" if size == length else f"chunks of {size}"
            print(f"| {tau_value} | {name} | {len(parts)} | {dens:.3f} | {total:.2f} | {stages['quant']:.2f} | "
                  f"{stages['select']:.2f} | {stages['compute']:.2f} | {total / whole_ms:.3f} |", flush=True)
            del parts, res
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="a kernels/csrc tree of another commit (Lq == Lk comparison); skipped if absent")
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--chunks", default="8192,16384")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    ok = True
    if args.base and os.path.isdir(args.base):
        ok = compare_base(load_base(args.base), args.reps)
    else:
        print("no base tree: the Lq == Lk comparison with an older commit is skipped")
    chunked_table(args.length, [int(c) for c in args.chunks.split(",")], args.reps)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
