"""Issue 18, item 2: the public op with the dense-heads rule against cuDNN, as the runner calls it.

At each length and input kind: cuDNN causal SDPA; the op at a uniform tau (every head sparse); then the op with
the calibration's rule applied: heads whose density at that tau exceeds --dense-above get tau 0 (dense heads go to
SDPA, the rest to the SALE kernels). Calls are `sale_attention(..., return_density=True)`, the runner's call.
Prints one table and writes JSON. Usage: python scripts/dense_heads_check.py [--lengths 131072] [--out F]
"""

from __future__ import annotations

import argparse
import json

import torch

from sale_cli.data.synthetic_qkv import make_inputs
from sale_cli.eval.bench_op import median_ms
from sale_cli.kernels import sale_attention
from sale_cli.kernels.dense import causal_sdpa


def case_row(length: int, data: str, tau0: float, dense_above: float) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = make_inputs(data, length, 32, 8, 128, torch.bfloat16, seed=0)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = median_ms(lambda: causal_sdpa(q, k, v), 5, warmup=2)
    tau = torch.full((32,), tau0, device="cuda")
    dens = sale_attention(q, k, v, tau, return_density=True).density[0].float().cpu()
    uniform = median_ms(lambda: sale_attention(q, k, v, tau, return_density=True), 5, warmup=2)
    rule = tau.clone()
    rule[(dens > dense_above).to(rule.device)] = 0
    res = sale_attention(q, k, v, rule, return_density=True)
    ruled = median_ms(lambda: sale_attention(q, k, v, rule, return_density=True), 5, warmup=2)
    # the dense heads must be exact: compare them with fp32 attention
    dense_heads = (rule == 0).nonzero().flatten()
    err = 0.0
    for h in dense_heads.tolist():
        ref = causal_sdpa(q[:, h:h + 1].float(), k[:, h // 4:h // 4 + 1].float(), v[:, h // 4:h // 4 + 1].float())
        err = max(err, (res.out[:, h:h + 1].float() - ref).abs().amax().item())
    return dict(length=length, data=data, tau=tau0, density=dens.mean().item(), dense_heads=len(dense_heads),
                density_rule=res.density.mean().item(), cudnn_ms=cudnn, uniform_ms=uniform, rule_ms=ruled,
                uniform_x=uniform / cudnn, rule_x=ruled / cudnn, max_abs_err_dense_heads_vs_fp32=err)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--cases", default="structured:0.0003,structured:0.0001,random:0.008,structured:0.008")
    ap.add_argument("--dense-above", type=float, default=0.5)
    ap.add_argument("--out", default="dense_heads.json")
    args = ap.parse_args()
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        for case in args.cases.split(","):
            data, tau0 = case.split(":")
            r = case_row(length, data, float(tau0), args.dense_above)
            rows.append(r)
            print(f"| {length} | {data} | {r['tau']:g} | {r['density']:.3f} | {r['dense_heads']}/32 | "
                  f"{r['density_rule']:.3f} | {r['cudnn_ms']:.1f} | {r['uniform_ms']:.1f} ({r['uniform_x']:.2f}x) | "
                  f"{r['rule_ms']:.1f} ({r['rule_x']:.2f}x) | {r['max_abs_err_dense_heads_vs_fp32']:.3g} |", flush=True)
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(dict(dense_above=args.dense_above, rows=rows), f, indent=1)


if __name__ == "__main__":
    print("| length | data | tau | density | dense heads (rule) | density (rule) | cuDNN ms | op, uniform tau "
          "| op, rule | dense heads: max abs err vs fp32 |")
    main()
