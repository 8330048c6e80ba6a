"""The reference SALE op against brute-force float64 implementations of docs/SPEC.md."""

import math

import pytest
import torch

from sale_cli.kernels import sale_attention


def rand_qkv(B, Hq, Hkv, L, d, dtype=torch.float32, seed=None, peaked=False):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % (2**31))
    q = torch.randn(B, Hq, L, d, generator=g)
    k = torch.randn(B, Hkv, L, d, generator=g)
    v = torch.randn(B, Hkv, L, d, generator=g)
    if peaked:  # a few strongly attended keys, like real attention heads
        k = k + 4.0 * (torch.rand(B, Hkv, L, 1, generator=g) < 0.02) * q.mean(dim=(1, 2), keepdim=True)[:, :1]
        q = q * 1.5
    return q.to(dtype), k.to(dtype), v.to(dtype)


def spec_blocks(L, bq, bk, sink, window, Lk=None):
    """Causally visible and R key blocks per query block, written straight from the spec (loops).

    L query rows, the last L of ``Lk`` positions (default L: a whole prefill)."""
    Lk = L if Lk is None else Lk
    off = Lk - L
    nQ, nK = math.ceil(L / bq), math.ceil(Lk / bk)
    vis = torch.zeros(nQ, nK, dtype=torch.bool)
    r = torch.zeros(nQ, nK, dtype=torch.bool)
    for qb in range(nQ):
        first_key, last_key = qb * bq + off, min((qb + 1) * bq, L) - 1 + off
        for kb in range(nK):
            keys = range(kb * bk, min((kb + 1) * bk, Lk))
            vis[qb, kb] = keys[0] <= last_key
            in_sink = any(j < sink for j in keys)
            in_local = any(first_key - window <= j <= last_key for j in keys)
            r[qb, kb] = vis[qb, kb] and (in_sink or in_local)
    return vis, r


def elementwise(blocks, bq, bk, L):
    return blocks.repeat_interleave(bq, 0)[:L].repeat_interleave(bk, 1)[:, :L]


def masked_attention64(q, k, v, mask, scale):
    """float64 attention of q [B,Hq,L,d] over the keys where mask [B,Hq,L,L] (or broadcastable) is True."""
    G = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(G, 1)
    v = v.double().repeat_interleave(G, 1)
    z = scale * q.double() @ k.transpose(-1, -2)
    z = z.masked_fill(~mask, -math.inf)
    return torch.softmax(z, -1) @ v, torch.logsumexp(z, -1)


def brute_force_map(q, k, tau, bq, bk, sink, window, scale):
    """Block map from the full float64 logit matrix; also the log-margin of each block's best key."""
    B, Hq, L, _ = q.shape
    G = Hq // k.shape[1]
    vis, r = spec_blocks(L, bq, bk, sink, window)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    in_r = elementwise(r, bq, bk, L) & causal
    z = scale * q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2)
    zr = z.masked_fill(~in_r, -math.inf)
    m = zr.amax(-1, keepdim=True)
    log_l = torch.log(torch.exp(zr - m).sum(-1, keepdim=True))
    log_ratio = (z - m - log_l).masked_fill(~causal | in_r, -math.inf)  # log RAS of candidate keys
    nQ, nK = vis.shape
    pad = torch.nn.functional.pad(log_ratio, (0, nK * bk - L, 0, nQ * bq - L), value=-math.inf)
    best = pad.unflatten(3, (nK, bk)).unflatten(2, (nQ, bq)).amax(dim=(3, 5))  # [B,Hq,nQ,nK]
    log_tau = torch.log(tau.double()).view(1, Hq, 1, 1)
    sel = (best > log_tau) | r
    sel = torch.where(tau.view(1, Hq, 1, 1) == 0, vis, sel) & vis
    return sel, (best - log_tau).abs()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("L", [7, 200, 1337])
def test_tau_zero_and_short_inputs_are_dense(dtype, tol, L):
    q, k, v = rand_qkv(2, 6, 2, L, 32, dtype)
    scale = 1 / math.sqrt(32)
    ref, ref_lse = masked_attention64(q, k, v, torch.ones(L, L, dtype=torch.bool).tril(), scale)
    for tau, dense_below in ((torch.zeros(6), 0), (torch.full((6,), 0.05), 4096)):
        res = sale_attention(q, k, v, tau, dense_below=dense_below, return_lse=True, return_block_map=True)
        assert res.out.dtype == dtype and res.out.shape == q.shape
        err = (res.out.double() - ref).norm() / ref.norm()
        assert err < tol, (tau, dense_below, err)
        assert torch.allclose(res.lse.double(), ref_lse, atol=1e-3, rtol=1e-4)
        assert torch.equal(res.density, torch.ones(2, 6))


@pytest.mark.parametrize("L,bq,bk,sink,window", [(1300, 64, 32, None, 128), (1100, 32, 16, 40, 0), (1500, 64, 64, 0, 300)])
def test_huge_tau_computes_exactly_r(L, bq, bk, sink, window):
    q, k, v = rand_qkv(1, 4, 4, L, 16, torch.float32)
    scale = 0.3
    res = sale_attention(q, k, v, torch.full((4,), 1e30), scale=scale, block_q=bq, block_k=bk, sink_tokens=sink,
                         local_window=window, dense_below=0, return_block_map=True, return_lse=True)
    _, r = spec_blocks(L, bq, bk, bk if sink is None else sink, window)
    assert torch.equal(res.block_map, r.expand(1, 4, -1, -1))
    mask = elementwise(r, bq, bk, L) & torch.ones(L, L, dtype=torch.bool).tril()
    ref, ref_lse = masked_attention64(q, k, v, mask, scale)
    assert (res.out.double() - ref).abs().max() < 1e-5
    assert (res.lse.double() - ref_lse).abs().max() < 1e-4
    vis, _ = spec_blocks(L, bq, bk, 0, 0)
    assert torch.allclose(res.density, (r.sum() / vis.sum()).float().expand(1, 4))


@pytest.mark.parametrize(
    "B,Hq,Hkv,L,d,bq,bk,sink,window",
    [(1, 4, 2, 1100, 32, 64, 32, None, 128), (2, 3, 1, 1377, 16, 32, 32, 64, 64), (1, 2, 2, 1601, 64, 64, 16, 16, 0)],
)
def test_estimate_none_matches_brute_force(B, Hq, Hkv, L, d, bq, bk, sink, window):
    q, k, v = rand_qkv(B, Hq, Hkv, L, d, peaked=True)
    tau = torch.tensor([0.0, 0.002, 0.02, 0.2][:Hq]) if Hq < 4 else torch.tensor([0.0, 0.002, 0.02, 0.2])
    scale = 1 / math.sqrt(d)
    res = sale_attention(q, k, v, tau, block_q=bq, block_k=bk, sink_tokens=sink, local_window=window,
                         estimate="none", dense_below=0, return_block_map=True)
    want, margin = brute_force_map(q, k, tau, bq, bk, bk if sink is None else sink, window, scale)
    differ = res.block_map != want
    assert not (differ & (margin > 1e-4)).any(), "block map differs away from ties"
    assert differ.sum() <= 2
    assert 0 < res.density.min() and res.density.max() <= 1
    assert want[:, tau > 0].float().mean() < 1, "the case must exercise sparsity"
    # the output is exact attention over the computed blocks
    mask = elementwise_batch(res.block_map, bq, bk, L) & torch.ones(L, L, dtype=torch.bool).tril()
    ref, _ = masked_attention64(q, k, v, mask, scale)
    assert (res.out.double() - ref).abs().max() < 1e-5


def elementwise_batch(block_map, bq, bk, L):
    return block_map.repeat_interleave(bq, 2)[:, :, :L].repeat_interleave(bk, 3)[..., :L]


@pytest.mark.parametrize("estimate", ["int8", "int4"])
@pytest.mark.parametrize("quant_group", ["per_token", "per_block"])
def test_quantized_estimates_track_exact_selection(estimate, quant_group):
    q, k, v = rand_qkv(1, 4, 2, 2048, 64, peaked=True)
    tau = torch.tensor([0.001, 0.004, 0.01, 0.03])
    kw = dict(dense_below=0, return_block_map=True, quant_group=quant_group)
    exact = sale_attention(q, k, v, tau, estimate="none", **kw).block_map
    first = sale_attention(q, k, v, tau, estimate=estimate, **kw)
    again = sale_attention(q.clone(), k.clone(), v.clone(), tau, estimate=estimate, **kw)
    assert torch.equal(first.block_map, again.block_map) and torch.equal(first.out, again.out)
    agree = (first.block_map == exact).float().mean().item()
    assert agree > (0.97 if estimate == "int8" else 0.85), agree
    assert exact.float().mean() < 0.95


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_equals_repeated_kv(dtype):
    q, k, v = rand_qkv(2, 8, 2, 1200, 32, dtype, peaked=True)
    tau = torch.rand(8) * 0.02
    kw = dict(dense_below=0, return_block_map=True, return_lse=True)
    gqa = sale_attention(q, k, v, tau, **kw)
    rep = sale_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), tau, **kw)
    assert torch.equal(gqa.block_map, rep.block_map)
    assert torch.allclose(gqa.out.float(), rep.out.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert torch.allclose(gqa.lse, rep.lse, atol=1e-4)


def test_output_written_everywhere_with_poisoned_memory():
    q, k, v = rand_qkv(1, 4, 1, 1500, 16, peaked=True)
    det, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # torch.empty* now returns NaN-filled memory
    try:
        res = sale_attention(q, k, v, torch.full((4,), 0.3), dense_below=0, return_lse=True, return_block_map=True)
    finally:
        torch.use_deterministic_algorithms(det)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    assert torch.isfinite(res.out).all() and torch.isfinite(res.lse).all()
    assert res.density.lt(1).any()


def test_memory_is_bounded_at_32k_on_cpu():
    """A 32K call must not build an L x L matrix (4 GiB in fp32): peak extra memory stays far below."""
    import resource

    L = 32768
    q, k, v = rand_qkv(1, 2, 1, L, 16, torch.bfloat16)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = sale_attention(q, k, v, torch.tensor([0.05, 0.5]), return_density=True)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert res.out.shape == q.shape and torch.isfinite(res.out.float()).all()
    assert grown_mib < 1500, grown_mib
    assert res.density[0, 1] < 0.5


def _bad_calls():
    q, k, v = rand_qkv(1, 4, 2, 64, 8)
    t = torch.zeros(4)
    yield "q must be a 4-D", (q[0], k, v, t), {}
    yield "k must be a 4-D", (q, k[0], v, t), {}
    yield "multiple of k/v heads", (torch.randn(1, 3, 64, 8), k, v, torch.zeros(3)), {}
    yield "share one dtype", (q.half(), k, v, t), {}
    yield "float16, bfloat16 or float32", (q.double(), k.double(), v.double(), t), {}
    yield "head dim", (torch.randn(1, 4, 64, 16), k, v, t), {}
    yield "same shape", (q, k, v[:, :, :32], t), {}
    yield "must not exceed", (torch.randn(1, 4, 80, 8), k, v, t), {}
    yield "thresholds must have shape [4]", (q, k, v, torch.zeros(2)), {}
    yield "thresholds must have shape [4]", (q, k, v, torch.zeros(2, 4)), {}
    yield "NaN", (q, k, v, torch.tensor([0.0, float("nan"), 0, 0])), {}
    yield ">= 0", (q, k, v, torch.tensor([0.0, -1e-3, 0, 0])), {}
    yield "finite", (q, k, v, torch.tensor([0.0, float("inf"), 0, 0])), {}
    yield "thresholds must be a torch.Tensor", (q, k, v, [0.0] * 4), {}
    yield "estimate must be one of", (q, k, v, t), {"estimate": "int2"}
    yield "quant_group must be one of", (q, k, v, t), {"quant_group": "per_head"}
    yield "backend must be one of", (q, k, v, t), {"backend": "triton"}
    yield "block_q must be a positive int", (q, k, v, t), {"block_q": 0}
    yield "block_k must be a positive int", (q, k, v, t), {"block_k": 2.5}
    yield "local_window must be an int >= 0", (q, k, v, t), {"local_window": -1}
    yield "sink_tokens must be an int >= 0", (q, k, v, t), {"sink_tokens": -4}
    yield "dense_below must be an int >= 0", (q, k, v, t), {"dense_below": None}
    yield "scale must be a positive finite", (q, k, v, t), {"scale": float("inf")}
    if not torch.cuda.is_available():
        yield "backend='cuda' needs CUDA tensors", (q, k, v, t), {"backend": "cuda"}


@pytest.mark.parametrize("message,args,kwargs", list(_bad_calls()), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs_raise_clear_errors(message, args, kwargs):
    with pytest.raises(ValueError) as info:
        sale_attention(*args, **kwargs)
    assert message in str(info.value)


def test_device_mix_is_rejected():
    q, k, v = rand_qkv(1, 2, 2, 16, 8)
    meta_k = k.to("meta")
    with pytest.raises(ValueError, match="one device"):
        sale_attention(q, meta_k, v, torch.zeros(2))


# ---------------------------------------------------------------------------------------------------------------
# chunks: Lq < Lk, the queries are the last Lq positions (bottom-right causal)


def chunk_qkv(B, Hq, Hkv, Lq, Lk, d, dtype=torch.float32, seed=0):
    """Peaked q [B,Hq,Lq,d] and k, v [B,Hkv,Lk,d]: the queries are the last Lq rows of a whole-length draw."""
    q, k, v = rand_qkv(B, Hq, Hkv, Lk, d, seed=seed, peaked=True)
    return q[:, :, Lk - Lq:].to(dtype), k.to(dtype), v.to(dtype)


def bottom_right(Lq, Lk):
    return torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)


def expand_blocks(blocks, bq, bk, Lq, Lk):
    return blocks.repeat_interleave(bq, -2)[..., :Lq, :].repeat_interleave(bk, -1)[..., :Lk]


def oracle_quantize(x, qmax, group):
    """float64 symmetric quantization of x [..., L, d] in groups of ``group`` rows (spec section 5.3)."""
    amax = x.abs().amax(-1)
    L = amax.shape[-1]
    step = torch.stack([amax[..., i0:i0 + group].amax(-1) for i0 in range(0, L, group)], -1)
    step = step.repeat_interleave(group, -1)[..., :L] / qmax
    ints = torch.round(x / torch.where(step > 0, step, 1.0)[..., None]).clamp(-qmax, qmax)
    return ints, step


def oracle_sale(q, k, v, tau, *, bq=64, bk=32, sink=None, window=128, estimate="int8", quant_group="per_token",
                dense_below=0):
    """SALE of docs/SPEC.md in float64, written from the spec for any Lq <= Lk.

    Returns (block map [B,Hq,nQ,nK], margin of each block's best candidate key to its row threshold (log units),
    output over the returned map, lse)."""
    B, Hq, Lq, d = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G, scale = Hq // Hkv, 1 / math.sqrt(d)
    sink = bk if sink is None else sink
    vis, r = spec_blocks(Lq, bq, bk, sink, window, Lk)
    causal = bottom_right(Lq, Lk)
    in_r = expand_blocks(r, bq, bk, Lq, Lk) & causal
    qd, kd = q.double(), k.double()
    ks = kd - kd.mean(2, keepdim=True)  # smoothed K: over all Lk keys
    ks_q = ks.repeat_interleave(G, 1)
    zs = scale * qd @ ks_q.transpose(-1, -2)  # smoothed logits: raw ones minus a per-row constant
    if estimate == "none":
        zhat = zs
    else:
        qmax = {"int8": 127, "int4": 7}[estimate]
        q_mean = qd.mean(2, keepdim=True)  # over the call's Lq rows
        q_int, q_step = oracle_quantize(qd - q_mean, qmax, bq if quant_group == "per_block" else 1)
        k_int, k_step = oracle_quantize(ks, qmax, bk if quant_group == "per_block" else 1)
        k_int, k_step = k_int.repeat_interleave(G, 1), k_step.repeat_interleave(G, 1)
        shat = q_step[..., None] * k_step[..., None, :] * (q_int @ k_int.transpose(-1, -2))
        zhat = scale * (shat + q_mean @ ks_q.transpose(-1, -2))
    threshold = torch.logsumexp(zs.masked_fill(~in_r, -math.inf), -1, keepdim=True)  # m_i + ln l_i
    log_tau = torch.log(torch.where(tau > 0, tau, 1.0).double()).view(1, Hq, 1, 1)
    gap = (zhat - threshold - log_tau).masked_fill(~causal | in_r, -math.inf)
    nQ, nK = vis.shape
    pad = torch.nn.functional.pad(gap, (0, nK * bk - Lk, 0, nQ * bq - Lq), value=-math.inf)
    best = pad.unflatten(3, (nK, bk)).unflatten(2, (nQ, bq)).amax(dim=(3, 5))
    sel = ((best > 0) | r) & vis
    dense = (tau.view(1, Hq, 1, 1) == 0) | (Lk <= dense_below)
    sel = torch.where(dense, vis, sel)
    out, lse = masked_attention64(q, k, v, expand_blocks(sel, bq, bk, Lq, Lk) & causal, scale)
    return sel, best.abs(), out, lse


@pytest.mark.parametrize(
    "Lq,Lk,Hq,Hkv,d,dtype,estimate,quant_group",
    [
        (64, 2048, 4, 2, 32, torch.float32, "int8", "per_token"),
        (1000, 2500, 4, 1, 64, torch.bfloat16, "int4", "per_block"),
        (333, 1777, 2, 2, 16, torch.float16, "none", "per_token"),  # ragged both sides
        (1, 1500, 4, 2, 32, torch.float32, "int8", "per_block"),  # one row, as a 1-token last chunk
        (700, 700, 4, 2, 32, torch.float32, "int4", "per_token"),  # whole prefill, same oracle
    ],
)
def test_chunks_match_the_float64_oracle(Lq, Lk, Hq, Hkv, d, dtype, estimate, quant_group):
    q, k, v = chunk_qkv(1, Hq, Hkv, Lq, Lk, d, dtype, seed=Lq + Lk)
    tau = torch.tensor([0.0, 0.003, 0.02, 0.2][:Hq]) if Hq == 4 else torch.tensor([0.05, 0.3])
    res = sale_attention(q, k, v, tau, estimate=estimate, quant_group=quant_group, dense_below=0,
                         return_block_map=True, return_lse=True)
    want, margin, _, _ = oracle_sale(q, k, v, tau, estimate=estimate, quant_group=quant_group)
    nQ, nK = math.ceil(Lq / 64), math.ceil(Lk / 32)
    assert res.out.shape == q.shape and res.out.dtype == dtype and res.block_map.shape == (1, Hq, nQ, nK)
    differ = res.block_map != want
    assert not (differ & (margin > 1e-3)).any(), "block map differs from the oracle away from ties"
    assert differ.sum() <= 2
    if Lq > 64:
        assert want[:, tau > 0].float().mean() < 0.9, "the case must exercise sparsity"
    # the output and lse are exact attention over the blocks the op computed
    causal = bottom_right(Lq, Lk)
    ref, ref_lse = masked_attention64(q, k, v, expand_blocks(res.block_map, 64, 32, Lq, Lk) & causal, 1 / math.sqrt(d))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (res.out.double() - ref).abs().max() < tol
    assert (res.lse.double() - ref_lse).abs().max() < 1e-4
    vis, _ = spec_blocks(Lq, 64, 32, 0, 0, Lk)
    density = (res.block_map & vis).sum(dim=(-1, -2)).float() / vis.sum()
    assert torch.allclose(res.density, density)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_chunked_dense_equals_whole_dense(dtype, tol):
    L, bounds = 2500, (0, 640, 1280, 2496, 2500)  # multiples of 64, then a ragged 4-row chunk
    q, k, v = chunk_qkv(1, 4, 2, L, L, 32, dtype, seed=5)
    tau = torch.zeros(4)
    whole = sale_attention(q, k, v, tau, dense_below=0, return_lse=True)
    parts = [sale_attention(q[:, :, a:b], k[:, :, :b], v[:, :, :b], tau, dense_below=0, return_lse=True)
             for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    out = torch.cat([p.out for p in parts], 2)
    lse = torch.cat([p.lse for p in parts], 2)
    ref, ref_lse = masked_attention64(q, k, v, bottom_right(L, L), 1 / math.sqrt(32))
    assert (out.double() - whole.out.double()).abs().max() < tol
    assert (out.double() - ref).abs().max() < tol and (lse.double() - ref_lse).abs().max() < 1e-4
    assert all(torch.equal(p.density, torch.ones(1, 4)) for p in parts)


@pytest.mark.parametrize("estimate,tau_value", [("none", 0.01), ("none", 0.1), ("int8", 1e30), ("int4", 0.0)])
def test_chunk_block_maps_equal_the_whole_call_rows(estimate, tau_value):
    """Chunks cut at multiples of block_q select per query block over the same keys as one whole call; only the
    smoothing means differ, and they do not matter for the exact estimate ('none': softmax is shift-invariant),
    for R alone (huge tau) or for dense heads (tau 0)."""
    L, bounds = 2200, (0, 1024, 1536, 2200)
    q, k, v = chunk_qkv(1, 4, 2, L, L, 32, seed=9)
    tau = torch.full((4,), tau_value)
    kw = dict(estimate=estimate, dense_below=0, return_block_map=True)
    whole = sale_attention(q, k, v, tau, **kw)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        part = sale_attention(q[:, :, a:b], k[:, :, :b], v[:, :, :b], tau, **kw)
        nkc = part.block_map.shape[-1]
        rows = whole.block_map[:, :, a // 64:math.ceil(b / 64)]
        assert torch.equal(part.block_map, rows[..., :nkc]), (a, b)
        assert not rows[..., nkc:].any()
    if estimate == "none":
        assert whole.block_map.float().mean() < 0.9, "the case must exercise sparsity"


def test_dense_below_counts_keys_not_queries():
    q, k, v = chunk_qkv(1, 2, 1, 64, 1100, 32, seed=3)
    tau = torch.full((2,), 0.5)
    long = sale_attention(q, k, v, tau, dense_below=1024, return_density=True)
    assert (long.density < 1).all(), "64 rows over 1100 keys stay sparse"
    k, v = k[:, :, :1000], v[:, :, :1000]
    short = sale_attention(q, k, v, tau, dense_below=1024, return_density=True, return_block_map=True)
    assert torch.equal(short.density, torch.ones(1, 2))
    vis, _ = spec_blocks(64, 64, 32, 0, 0, 1000)
    assert torch.equal(short.block_map, vis.expand(1, 2, -1, -1))
    ref, _ = masked_attention64(q, k, v, bottom_right(64, 1000), 1 / math.sqrt(32))
    assert (short.out.double() - ref).abs().max() < 1e-5


def test_more_queries_than_keys_is_an_error():
    q, k, v = chunk_qkv(1, 2, 1, 64, 64, 16)
    with pytest.raises(ValueError, match=r"q length \(64\) must not exceed k length \(32\)"):
        sale_attention(q, k[:, :, :32], v[:, :, :32], torch.zeros(2))


@pytest.mark.parametrize("Lq", [1, 100, 512])
def test_causal_sdpa_is_bottom_right(Lq):
    """The op's dense path (SDPA) for chunks: bottom-right, unlike SDPA's own is_causal (top-left)."""
    from sale_cli.kernels.api import causal_sdpa

    Lk = 777
    q, k, v = chunk_qkv(1, 4, 2, Lq, Lk, 16, seed=Lq)
    ref, _ = masked_attention64(q, k, v, bottom_right(Lq, Lk), 0.25)
    got = causal_sdpa(q, k, v, 0.25)
    assert (got.double() - ref).abs().max() < 1e-5
    if Lq > 1:
        top_left = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25,
                                                                    enable_gqa=True)
        assert (top_left.double() - ref).abs().max() > 1e-2, "the test must tell the two alignments apart"
