"""Synthetic attention inputs q [B, Hq, L, d], k and v [B, Hkv, L, d] for the op alone.

Two kinds: "structured" (LLM-like peaked attention: a sink, heavy keys, a local bias) and "random" (N(0, 1),
flat attention). One generator for `sale bench-op`, the CUDA kernel tests and the kernel scripts. bench-op's
figures depend on the values, so the defaults (batch 1, spread off, no K offset) must keep producing the same
tensors for a seed; the options only add draws after the default ones.
"""

from __future__ import annotations

import math

KINDS = ("structured", "random")
HEAVY_FRACTIONS = (0.05, 0.1, 0.2, 0.35)  # of the key blocks holding a heavy key, by kv head (cyclically)
LOCAL_REACH = 4096  # local-bias distances are log-uniform in [1, LOCAL_REACH]


def random_qkv(length, heads, kv_heads, head_dim, dtype, seed, device="cuda", *, batch=1, k_offset=0.0):
    """q, k, v ~ N(0, 1): flat attention, so nearly every block passes (density ~1); plus ``k_offset`` times a
    random per-channel offset on K (which the op's smoothing removes)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, heads, length, head_dim, device=device, generator=g)
    k = torch.randn(batch, kv_heads, length, head_dim, device=device, generator=g)
    v = torch.randn(batch, kv_heads, length, head_dim, device=device, generator=g)
    if k_offset:
        k = k + k_offset * torch.randn(batch, kv_heads, 1, head_dim, device=device, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def structured_qkv(length, heads, kv_heads, head_dim, dtype, seed, device="cuda", *, batch=1, spread=False,
                   k_offset=0.0, block_k=32):
    """LLM-like peaked attention, built in an orthonormal basis per (batch, kv head): sink direction u, heavy
    direction w, background in the other d-2 dims; logits are q.k / sqrt(d).

    - attention sink: key 0 = 1.25 sqrt(d) u and every query has 8 u: sink logit 10 in every row;
    - heavy keys: in kv head h, HEAVY_FRACTIONS[h % 4] x (key blocks of ``block_k``) keys get 1.75 sqrt(d) w;
      query j of a kv group carries 4 (0.8 + 0.1 j) w: heavy logits 5.6-7.7, above the threshold at
      tau 0.004 (10 + ln 0.004 = 4.5);
    - local bias: half the rows resemble a key at a log-uniform distance in [1, LOCAL_REACH];
    - background logits about N(0, 1).
    Density at tau 0.004 is about the heavy fraction plus a few percent (0.1-0.25 at 32K-128K).

    ``spread`` (the kernel tests' variant) spreads the heavy logits over the thresholds instead (2.5-10, around
    10 + ln tau = 3.1, 4.5, 5.2 for tau 0.001, 0.004, 0.008), so that many decisions lie near them: each heavy
    key's strength times a uniform [0.6, 1.4], query head h carries 4 (0.6 + 0.15 (h % 4)) (1 + 0.2 N) w and
    8 (1 + 0.05 N) u; background logits about N(0, 0.6^2), the local rows 0.5 background + 0.7 the key.
    ``k_offset``: plus that times a random per-channel offset on K (the op's smoothing removes it).
    """
    import torch

    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=g)

    def rand(*shape):
        return torch.rand(*shape, device=device, generator=g)

    groups = heads // kv_heads
    q = torch.empty(batch, heads, length, head_dim, device=device)
    k = torch.empty(batch, kv_heads, length, head_dim, device=device)
    v = randn(batch, kv_heads, length, head_dim).to(dtype)
    sd = math.sqrt(head_dim)
    n_blocks = (length + block_k - 1) // block_k
    pos = torch.arange(length, device=device)
    background, keep, near = (0.6, 0.5, 0.7) if spread else (1.0, 0.6, 0.9)
    for b in range(batch):
        for kh in range(kv_heads):
            basis, _ = torch.linalg.qr(randn(head_dim, head_dim))
            u, w, bg = basis[:, 0], basis[:, 1], basis[:, 2:]
            kb = randn(length, head_dim - 2)
            kk = kb @ bg.T
            kk[0] = (10.0 * sd / 8.0) * u
            n_heavy = int(HEAVY_FRACTIONS[kh % len(HEAVY_FRACTIONS)] * n_blocks)
            heavy = 1 + (rand(n_heavy) * (length - 1)).long()
            strength = (7.0 * sd / 4.0) * ((0.6 + 0.8 * rand(n_heavy))[:, None] if spread else 1.0)
            kk[heavy] += strength * w
            k[b, kh] = kk
            for j in range(groups):
                qb = background * randn(length, head_dim - 2)
                dist = torch.exp(rand(length) * math.log(LOCAL_REACH)).long()
                src = (pos - dist).clamp(min=0)
                sel = (rand(length) < 0.5) & (src > 0)
                qb = torch.where(sel[:, None], keep * qb + near * kb[src], qb)
                if spread:
                    h = kh * groups + j
                    sink = 8.0 * (1 + 0.05 * randn(length, 1))
                    heavy_w = 4.0 * (0.6 + 0.15 * (h % 4)) * (1 + 0.2 * randn(length, 1))
                else:
                    sink, heavy_w = 8.0, 4.0 * (0.8 + 0.1 * j)
                q[b, kh * groups + j] = qb @ bg.T + sink * u + heavy_w * w
    if k_offset:
        k = k + k_offset * randn(batch, kv_heads, 1, head_dim)
    return q.to(dtype), k.to(dtype), v


def make_inputs(data, length, heads, kv_heads, head_dim, dtype, seed, device="cuda", **options):
    """(q, k, v) of the named kind (KINDS); ``options`` as the kind's function takes them."""
    if data not in KINDS:
        raise ValueError(f"synthetic data must be one of {', '.join(KINDS)}, got {data!r}")
    make = structured_qkv if data == "structured" else random_qkv
    return make(length, heads, kv_heads, head_dim, dtype, seed, device=device, **options)
