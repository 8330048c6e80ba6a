"""Benchmark the CUDA SALE kernels against dense cuDNN (or flash) SDPA on Llama-3.1-8B attention shapes.

    python -m sale_cli.kernels.bench_kernel --lengths 8192 16384 32768 65536 131072 --taus 0.001 0.004

B=1, 32 query heads, 8 kv heads, d=128, bf16, causal prefill. Times (median of repeats, CUDA events) dense SDPA
and the three SALE passes (quant / select / compute) for a few fixed thresholds on random data and on a
structured case (each query resembles one earlier key: peaked attention). Prints a table, writes JSON
(results/bench_kernel.json by default) and the achieved TFLOP/s of the compute pass counting computed blocks
only (4 * d * 64 * 32 flops per computed block pair, masked diagonal elements included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def _make_peaked_old(L, Hq, Hkv, d, dtype, seed):
    """The first structured generator (kept as data="uniform_peaked" for comparison with earlier numbers): a
    sink and each query resembling one uniformly drawn earlier key; its sink logit varies by +-2 per row, so
    at tau 0.004 most blocks pass (density ~0.8)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, Hq, L, d, device="cuda", generator=g, dtype=torch.float32)
    k = torch.randn(1, Hkv, L, d, device="cuda", generator=g, dtype=torch.float32)
    v = torch.randn(1, Hkv, L, d, device="cuda", generator=g, dtype=torch.float32).to(dtype)
    G = Hq // Hkv
    u = torch.randn(d, device="cuda", generator=g)
    u = u / u.norm()
    k[0, :, 0] = 2.0 * d**0.5 * u
    pos = torch.arange(L, device="cuda")
    for h in range(Hq):  # per head to bound memory
        idx = (torch.rand(L, device="cuda", generator=g) * (pos + 1)).long()
        q[0, h] = 0.3 * q[0, h] + k[0, h // G, idx] + 6.0 * u
    k = k + 0.5
    return q.to(dtype), k.to(dtype), v


HEAVY_FRACTIONS = (0.05, 0.1, 0.2, 0.35)


def _make_structured(L, Hq, Hkv, d, dtype, seed):
    """LLM-like peaked attention, built in an orthonormal basis per kv head (sink direction u, heavy direction
    w, background in the other d-2 dims):
    - attention sink: key 0 = 10 sqrt(d)/8 u, every query has 8 u -> sink logit 10 for every row (stable);
    - heavy keys: in kv head h a fraction HEAVY_FRACTIONS[h % 4] of the key blocks holds one key with +7 sqrt(d)/4 w;
      queries carry (0.8 + 0.1 j) 4 w -> heavy logits 5.6-7.7, above the threshold (10 + ln 0.004 = 4.5);
    - local bias: half the rows resemble a key at a log-uniform distance in [1, 4096];
    - background logits ~N(0, 1).
    Density at tau 0.004 is about the heavy fraction plus a few percent (0.1-0.25 at 32K-128K)."""
    import math

    g = torch.Generator(device="cuda").manual_seed(seed)
    G = Hq // Hkv
    q = torch.empty(1, Hq, L, d, device="cuda")
    k = torch.empty(1, Hkv, L, d, device="cuda")
    v = torch.randn(1, Hkv, L, d, device="cuda", generator=g).to(dtype)
    sd = math.sqrt(d)
    nK = (L + 31) // 32
    pos = torch.arange(L, device="cuda")
    for kh in range(Hkv):
        basis, _ = torch.linalg.qr(torch.randn(d, d, device="cuda", generator=g))
        u, w, bg = basis[:, 0], basis[:, 1], basis[:, 2:]
        kb = torch.randn(L, d - 2, device="cuda", generator=g)
        kk = kb @ bg.T
        kk[0] = (10.0 * sd / 8.0) * u
        nh = int(HEAVY_FRACTIONS[kh % len(HEAVY_FRACTIONS)] * nK)
        heavy = 1 + (torch.rand(nh, device="cuda", generator=g) * (L - 1)).long()
        kk[heavy] += (7.0 * sd / 4.0) * w
        k[0, kh] = kk
        for j in range(G):
            qb = torch.randn(L, d - 2, device="cuda", generator=g)
            dist = torch.exp(torch.rand(L, device="cuda", generator=g) * math.log(4096)).long()
            src = (pos - dist).clamp(min=0)
            sel = (torch.rand(L, device="cuda", generator=g) < 0.5) & (src > 0)
            qb = torch.where(sel[:, None], 0.6 * qb + 0.9 * kb[src], qb)
            q[0, kh * G + j] = qb @ bg.T + 8.0 * u + (4.0 * (0.8 + 0.1 * j)) * w
    return q.to(dtype), k.to(dtype), v


def _make(L, Hq, Hkv, d, dtype, data, seed):
    if data == "structured":
        return _make_structured(L, Hq, Hkv, d, dtype, seed)
    if data == "uniform_peaked":
        return _make_peaked_old(L, Hq, Hkv, d, dtype, seed)
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, Hq, L, d, device="cuda", generator=g, dtype=torch.float32)
    k = torch.randn(1, Hkv, L, d, device="cuda", generator=g, dtype=torch.float32)
    v = torch.randn(1, Hkv, L, d, device="cuda", generator=g, dtype=torch.float32)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _time(fn, reps, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def _dense_fn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    G = q.shape[1] // k.shape[1]
    ke = k.repeat_interleave(G, dim=1)
    ve = v.repeat_interleave(G, dim=1)
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        def fn(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, ke, ve, is_causal=True)
        try:
            fn()
            torch.cuda.synchronize()
            return fn, backend.name
        except Exception:  # backend not available for this shape / build
            continue
    return (lambda: torch.nn.functional.scaled_dot_product_attention(q, ke, ve, is_causal=True)), "default"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--taus", type=float, nargs="+", default=[0.001, 0.004])
    ap.add_argument("--data", nargs="+", default=["random", "structured"],
                    choices=["random", "structured", "uniform_peaked"])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="results/bench_kernel.json")
    args = ap.parse_args(argv)

    from sale_cli.kernels import cuda_backend

    ok, why = cuda_backend.available()
    if not ok:
        raise SystemExit(f"CUDA backend unavailable: {why}")
    dtype = torch.bfloat16
    Hq, Hkv, d = args.heads, args.kv_heads, args.head_dim
    rows = []
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; Hq={Hq} Hkv={Hkv} d={d} bf16 B=1", flush=True)
    for L in args.lengths:
        for data in args.data:
            q, k, v = _make(L, Hq, Hkv, d, dtype, data, seed=L)
            dfn, dname = _dense_fn(q, k, v)
            dense_ms = _time(dfn, args.reps)
            torch.cuda.empty_cache()
            vis_pairs = cuda_backend._visible_pairs(L, 64, 32)
            for tau_v in args.taus:
                tau = torch.full((Hq,), tau_v, device="cuda")
                kw = dict(scale=None, block_q=64, block_k=32, sink_tokens=None, local_window=128, estimate="int8",
                          quant_group="per_token", need_block_map=False, need_lse=False)
                stages = {"quant": [], "select": [], "compute": [], "total": []}
                density = None
                for i in range(args.reps + 2):
                    a = torch.cuda.Event(enable_timing=True)
                    b = torch.cuda.Event(enable_timing=True)
                    a.record()
                    _, _, _, dens, t = cuda_backend.sale_attention_cuda(q, k, v, tau, timing=True, **kw)
                    b.record()
                    b.synchronize()
                    if i >= 2:
                        for key in ("quant", "select", "compute"):
                            stages[key].append(t[key])
                        stages["total"].append(a.elapsed_time(b))
                    density = dens.mean().item()
                med = {key: statistics.median(val) for key, val in stages.items()}
                computed_pairs = density * vis_pairs * Hq
                flops = 4.0 * d * 64 * 32 * computed_pairs
                tflops = flops / (med["compute"] * 1e-3) / 1e12
                row = dict(L=L, data=data, tau=tau_v, density=density, dense_ms=dense_ms, dense_backend=dname,
                           quant_ms=med["quant"], select_ms=med["select"], compute_ms=med["compute"],
                           total_ms=med["total"], speedup=dense_ms / med["total"], compute_tflops=tflops,
                           overhead_pct=100.0 * (med["quant"] + med["select"]) / dense_ms)
                rows.append(row)
                print(f"L={L:>6} {data:<14} tau={tau_v:<6} dens={density:.3f} dense={dense_ms:8.2f}ms ({dname}) "
                      f"quant={med['quant']:7.2f} select={med['select']:8.2f} compute={med['compute']:8.2f} "
                      f"total={med['total']:8.2f} speedup={dense_ms / med['total']:5.2f}x "
                      f"compute={tflops:6.1f} TFLOP/s", flush=True)
            del q, k, v
            torch.cuda.empty_cache()

    print("\n| L | data | tau | density | dense ms | quant | select | compute | total | speedup | compute TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['L']} | {r['data']} | {r['tau']} | {r['density']:.3f} | {r['dense_ms']:.2f} | {r['quant_ms']:.2f} "
              f"| {r['select_ms']:.2f} | {r['compute_ms']:.2f} | {r['total_ms']:.2f} | {r['speedup']:.2f}x "
              f"| {r['compute_tflops']:.1f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=dev, torch=torch.__version__, time=time.strftime("%Y-%m-%d %H:%M:%S"),
                       shape=dict(B=1, Hq=Hq, Hkv=Hkv, d=d, dtype="bf16"), rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
