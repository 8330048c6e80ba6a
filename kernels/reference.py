"""Pure-PyTorch reference of SALE attention (``docs/SPEC.md``); defines the semantics.

Everything is computed in fp32 from the inputs, query blocks are processed in chunks so memory stays
bounded (no L x L matrix), and GQA reads the shared K/V head directly.

All logits that take part in selection are those of the smoothed K (K minus its per-channel mean): the exact
R statistics m_i, l_i as well as the estimate. Softmax is shift-invariant per row, so the Relative Attention
Score is the same as with the raw K, and the estimate (of smoothed logits) is compared on the same footing.
The output and the returned log-sum-exp are those of the raw logits.
"""

from __future__ import annotations

import math

import torch

QMAX = {"int4": 7, "int8": 127}

# Upper bound on the elements of one [heads, rows, keys] fp32 work tensor (64 MiB).
_CHUNK_ELEMENTS = 1 << 24


def quantize(x: torch.Tensor, qmax: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integer quantization of ``x`` [..., L, d] in groups of ``group`` consecutive rows.

    Returns (integers as fp32, step per row [..., L]); step = max|x| / qmax over the group, rounding is
    half to even, and an all-zero group gets step 0 and integers 0.
    """
    L = x.shape[-2]
    amax = x.abs().amax(dim=-1)
    if group > 1:
        pad = (-L) % group
        padded = torch.nn.functional.pad(amax, (0, pad))
        amax = padded.unflatten(-1, (-1, group)).amax(-1).repeat_interleave(group, dim=-1)[..., :L]
    step = amax / qmax
    safe = torch.where(step > 0, step, torch.ones_like(step))
    ints = torch.round(x / safe.unsqueeze(-1)).clamp_(-qmax, qmax)
    return ints, step


def _block_ranges(Lq: int, Lk: int, block_q: int, block_k: int, sink_tokens: int, local_window: int):
    """Per query block: (last visible key block + 1, R as a bool row over key blocks) as tensors."""
    nQ, nK = math.ceil(Lq / block_q), math.ceil(Lk / block_k)
    off = Lk - Lq
    qb = torch.arange(nQ)
    first_key = qb * block_q + off
    last_key = torch.clamp((qb + 1) * block_q, max=Lq) - 1 + off
    kb = torch.arange(nK)
    visible = (kb[None, :] * block_k) <= last_key[:, None]
    sink = (kb * block_k < sink_tokens)[None, :]
    lo = torch.clamp(first_key - local_window, min=0) // block_k
    local = (kb[None, :] >= lo[:, None]) & (kb[None, :] <= (last_key // block_k)[:, None])
    return visible, (sink | local) & visible


def visible_block_pairs(Lq: int, Lk: int, block_q: int, block_k: int) -> int:
    """Causally visible (query block, key block) pairs of one head: the denominator of the density."""
    off = Lk - Lq
    return sum(((min((qb + 1) * block_q, Lq) - 1 + off) // block_k) + 1 for qb in range(math.ceil(Lq / block_q)))


def sale_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    thresholds: torch.Tensor,
    *,
    scale: float,
    block_q: int,
    block_k: int,
    sink_tokens: int,
    local_window: int,
    estimate: str,
    quant_group: str,
    dense: bool,
    need_block_map: bool,
    need_lse: bool,
):
    """Reference SALE attention on validated inputs.

    Returns (out, lse or None, block_map or None, density [B, Hq] fp32). ``dense`` forces every causally
    visible block (the short-input rule); heads with tau == 0 are dense as well.
    """
    B, Hq, Lq, d = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    dev = q.device
    off = Lk - Lq
    nQ, nK = math.ceil(Lq / block_q), math.ceil(Lk / block_k)

    visible_blocks, r_blocks = (t.to(dev) for t in _block_ranges(Lq, Lk, block_q, block_k, sink_tokens, local_window))
    tau = thresholds.to(device=dev, dtype=torch.float32)
    dense_heads = (tau == 0) | dense
    log_tau = torch.log(torch.where(dense_heads, torch.ones_like(tau), tau))

    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=dev) if need_lse else None
    computed = torch.empty(B, Hq, nQ, nK, dtype=torch.bool, device=dev)

    int_dtype = torch.float32 if dev.type == "cpu" else torch.float64  # exact integer sums, no TF32
    for b in range(B):
        qf = q[b].float()
        kf = k[b].float()
        vf = v[b].float()
        k_mean = kf.mean(dim=1, keepdim=True)
        ks = kf - k_mean  # smoothed K: softmax-invariant, used for all logits
        q_kmean = scale * (qf.unflatten(0, (-1, G)) @ k_mean[:, None].transpose(-1, -2)).flatten(0, 1).squeeze(-1)
        if not dense and estimate != "none":
            qmax = QMAX[estimate]
            q_mean = qf.mean(dim=1, keepdim=True)
            qs = qf - q_mean
            qm = (q_mean.unflatten(0, (-1, G)) @ ks[:, None].transpose(-1, -2)).flatten(0, 1).squeeze(1)  # [Hq, Lk]
            per_block = quant_group == "per_block"
            q_int, q_step = quantize(qs, qmax, block_q if per_block else 1)
            k_int, k_step = quantize(ks, qmax, block_k if per_block else 1)

        heads_per_step = max(G, min(Hq, (_CHUNK_ELEMENTS // (block_q * Lk)) // G * G))
        for h0 in range(0, Hq, heads_per_step):
            hs = slice(h0, min(Hq, h0 + heads_per_step))
            nh = hs.stop - hs.start
            kv = slice(h0 // G, (hs.stop - 1) // G + 1)
            qb0 = 0
            while qb0 < nQ:
                # Grow the chunk of query blocks while the [heads, rows, keys] tensor stays in budget.
                qb1 = qb0 + 1
                while qb1 < nQ and nh * (qb1 + 1 - qb0) * block_q * min(Lk, (qb1 + 1) * block_q + off) <= _CHUNK_ELEMENTS:
                    qb1 += 1
                r0, r1 = qb0 * block_q, min(qb1 * block_q, Lq)
                kend = min(Lk, r1 + off)
                nkb = math.ceil(kend / block_k)
                rows = torch.arange(r0, r1, device=dev)
                keys = torch.arange(kend, device=dev)
                causal = keys[None, :] <= rows[:, None] + off  # [R, K]

                q_c = (scale * qf[hs, r0:r1]).unflatten(0, (-1, G))  # [kvh, G, R, d]
                z = (q_c @ ks[kv, None, :kend].transpose(-1, -2)).flatten(0, 1)  # [nh, R, K] scaled logits

                vis = visible_blocks[qb0:qb1, :nkb]
                if dense or bool(dense_heads[hs].all()):
                    sel = vis.expand(nh, -1, -1)
                else:
                    est = z if estimate == "none" else _estimate(
                        q_int[hs, r0:r1], q_step[hs, r0:r1], k_int[kv, :kend], k_step[kv, :kend], qm[hs, :kend],
                        scale, G, int_dtype)
                    sel = _select_blocks(z, est, causal, r_blocks[qb0:qb1, :nkb], vis, dense_heads[hs], log_tau[hs],
                                         block_q, block_k)
                computed[b, hs, qb0:qb1, :nkb] = sel
                computed[b, hs, qb0:qb1, nkb:] = False

                key_mask = _expand(sel, block_q, block_k, r1 - r0, kend) & causal
                z.masked_fill_(~key_mask, -math.inf)
                if lse is not None:
                    lse[b, hs, r0:r1] = torch.logsumexp(z, dim=-1) + q_kmean[hs, r0:r1]
                p = torch.softmax(z, dim=-1)
                o = (p.unflatten(0, (-1, G)) @ vf[kv, None, :kend]).flatten(0, 1)
                out[b, hs, r0:r1] = o.to(out.dtype)
                qb0 = qb1

    vis = visible_blocks.expand(B, Hq, nQ, nK)
    density = (computed & vis).sum(dim=(-1, -2)).float() / vis.sum(dim=(-1, -2)).float()
    return out, lse, (computed if need_block_map else None), density


def _expand(blocks: torch.Tensor, block_q: int, block_k: int, rows: int, keys: int) -> torch.Tensor:
    """Block mask [..., nq, nk] -> element mask [..., rows, keys]."""
    return blocks.repeat_interleave(block_q, dim=-2)[..., :rows, :].repeat_interleave(block_k, dim=-1)[..., :keys]


def _block_any(mask: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Element mask [H, R, K] -> [H, ceil(R/bq), ceil(K/bk)]: any element of each block."""
    H, R, K = mask.shape
    padded = torch.nn.functional.pad(mask, (0, (-K) % block_k, 0, (-R) % block_q))
    return padded.unflatten(2, (-1, block_k)).unflatten(1, (-1, block_q)).any(dim=4).any(dim=2)


def _estimate(q_int, q_step, k_int, k_step, qm, scale, G, int_dtype):
    """zhat = scale * (step_q * step_k * (Qint . Kint) + qm) for one chunk: [nh, R, K]."""
    acc = (q_int.unflatten(0, (-1, G)).to(int_dtype) @ k_int[:, None].transpose(-1, -2).to(int_dtype))
    acc = acc.flatten(0, 1).float()  # exact integer sums
    step = q_step[:, :, None] * k_step.repeat_interleave(G, dim=0)[:, None, :]
    return acc.mul_(step).add_(qm[:, None, :]).mul_(scale)


def _select_blocks(z, est, causal, r_blocks, visible_blocks, dense_heads, log_tau, block_q, block_k):
    """Computed blocks [nh, nq, nk] of one chunk: R, plus blocks where an estimated logit passes the RAS test."""
    in_r = _expand(r_blocks, block_q, block_k, z.shape[1], z.shape[2]) & causal  # [R, K], shared by the heads
    threshold = torch.logsumexp(z.masked_fill(~in_r, -math.inf), dim=-1, keepdim=True)  # m_i + ln(l_i)
    threshold += log_tau[:, None, None]
    passing = (est > threshold) & (causal & ~in_r)
    sel = (_block_any(passing, block_q, block_k) | r_blocks) & visible_blocks
    return torch.where(dense_heads[:, None, None], visible_blocks, sel)
