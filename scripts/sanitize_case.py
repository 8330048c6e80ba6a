"""Small CUDA SALE calls to run under compute-sanitizer; exits 1 unless every call succeeds with finite results.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/sanitize_case.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 scripts/sanitize_case.py --racecheck

Build the extension outside the sanitizer first (the build is cached):
    python3 -c "from sale_cli.kernels import cuda_backend as c; print(c.available())"

Default set (16 calls): B=1, L 777 (Hq=4, Hkv=2: two heads per selection CTA) and 1025 (Hq=8, Hkv=2: four), ragged
query and key blocks, d 64 and 128, bf16 and fp16, int8 and int4, compute="cuda", with lse and block map; the heads
take tau 0, 0.004, 0.05, 1e9 cyclically (dense, mixed, nearly R only, R only) on the structured inputs of
data/synthetic_qkv.py (an attention sink, heavy keys), so blocks are both computed and skipped.
--racecheck: 4 bf16 calls (L 777 d 64, L 1025 d 128; int8 and int4), kernel outputs only (no block map).
Prints one summary line.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from sale_cli.data.synthetic_qkv import make_inputs

HEADS = {777: (4, 2), 1025: (8, 2)}  # (Hq, Hkv) per length


def _call(L, d, dtype, estimate, checks: bool) -> str | None:
    """One backend call; returns a failure message or None."""
    from sale_cli.kernels import cuda_backend

    Hq, Hkv = HEADS[L]
    q, k, v = make_inputs("structured", L, Hq, Hkv, d, dtype, seed=L * 1000 + d)
    tau = torch.tensor([0.0, 0.004, 0.05, 1e9], device="cuda").repeat(Hq // 4)
    out, lse, bmap, density, _ = cuda_backend.sale_attention_cuda(
        q, k, v, tau, scale=None, block_q=64, block_k=32, sink_tokens=None, local_window=128, estimate=estimate,
        quant_group="per_token", need_block_map=checks, need_lse=True, compute="cuda")
    torch.cuda.synchronize()
    if not torch.isfinite(out).all():
        return "non-finite output"
    if not torch.isfinite(lse).all():
        return "non-finite lse"
    if not ((density > 0) & (density <= 1)).all():
        return f"density {density.tolist()}"
    if checks and not (bmap[0, 0].sum() > bmap[0, 3].sum() > 0):
        return "block map: the tau=0 head is not denser than the tau=1e9 head"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--racecheck", action="store_true", help="the smaller set: L 777, bf16, kernel outputs only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sanitize_case: FAILED: no CUDA device")
        return 1
    if args.racecheck:
        configs = [(L, d, torch.bfloat16, est) for L, d in ((777, 64), (1025, 128)) for est in ("int8", "int4")]
    else:
        configs = list(itertools.product([777, 1025], [64, 128], [torch.bfloat16, torch.float16], ["int8", "int4"]))
    failures = []
    for L, d, dtype, estimate in configs:
        name = f"L={L} d={d} {str(dtype).replace('torch.', '')} {estimate}"
        try:
            why = _call(L, d, dtype, estimate, checks=not args.racecheck)
        except Exception as exc:  # a CUDA fault or a rejected configuration: report it and go on
            why = f"{type(exc).__name__}: {exc}"
        if why:
            failures.append(f"{name}: {why}")
            print(f"FAIL {name}: {why}", file=sys.stderr)
    mode = "racecheck set" if args.racecheck else "memcheck set"
    if failures:
        print(f"sanitize_case: FAILED {len(failures)} of {len(configs)} calls ({mode}); first: {failures[0]}")
        return 1
    print(f"sanitize_case: all {len(configs)} calls ok ({mode}: B=1, Hq/Hkv 4/2 and 8/2, outputs finite)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
