"""One SALE call (quant, select, compute) on structured Llama-3.1-8B-shaped inputs, for profilers.

    ncu -k regex:sale_select_kernel -c 1 --set full python3 scripts/profile_kernels.py --length 32768

Runs a warm-up call (the extension build and first launches), then the profiled call.
"""

from __future__ import annotations

import argparse

import torch

from sale_cli.data.synthetic_qkv import make_inputs
from sale_cli.kernels import cuda_backend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--tau", type=float, default=0.004)
    ap.add_argument("--estimate", default="int8", choices=["int8", "int4"])
    ap.add_argument("--compute", default="cuda", choices=["cuda", "flex"])
    args = ap.parse_args()
    q, k, v = make_inputs("structured", args.length, 32, 8, 128, torch.bfloat16, seed=args.length)
    tau = torch.full((32,), args.tau, device="cuda")
    opts = dict(scale=None, block_q=64, block_k=32, sink_tokens=None, local_window=128, estimate=args.estimate,
                quant_group="per_token", need_block_map=False, need_lse=False, compute=args.compute)
    for _ in range(2):
        _, _, _, density, _ = cuda_backend.sale_attention_cuda(q, k, v, tau, **opts)
    torch.cuda.synchronize()
    print(f"L={args.length} density={density.mean().item():.3f}")


if __name__ == "__main__":
    main()
