"""CUDA SALE kernels vs the reference (kernels/reference.py) and a float64 brute force.

Skipped without a CUDA device. Checks: output vs float64 causal attention restricted to the kernel's own
block map, block maps vs the reference's int8 selection (all but a tiny fraction of borderline blocks), lse,
density, tau = 0 == dense, ragged L, GQA 32/8 and 9/3, d 64 and 128, B = 2, fp16 and bf16, poisoned memory,
per_token and per_block groups, runtime sink_tokens / local_window, and clear errors for unsupported options.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from sale_cli.kernels import cuda_backend  # noqa: E402
from sale_cli.kernels.reference import sale_attention_reference  # noqa: E402

BQ, BK = 64, 32


def _poison_allocator(nbytes: int) -> None:
    """Fill the caching allocator's free blocks with NaN so unwritten outputs show up."""
    x = torch.full((nbytes // 4 + 1024,), float("nan"), device="cuda", dtype=torch.float32)
    del x


def _inputs(B, Hq, Hkv, L, d, dtype, *, structured=False, seed=0, k_offset=0.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Hq, L, d, device="cuda", generator=g)
    k = torch.randn(B, Hkv, L, d, device="cuda", generator=g)
    v = torch.randn(B, Hkv, L, d, device="cuda", generator=g)
    if structured:
        # peaked attention as in real models: an attention sink (key 0, logit ~12 for every query) and each
        # query resembling one earlier key of its kv head (logit ~11), over a background of logits ~N(0, 1)
        G = Hq // Hkv
        idx = (torch.rand(B, Hq, L, device="cuda", generator=g) * (torch.arange(L, device="cuda") + 1)).long()
        kk = k.repeat_interleave(G, dim=1)
        tgt = torch.gather(kk, 2, idx[..., None].expand(-1, -1, -1, d))
        u = torch.randn(d, device="cuda", generator=g)
        u = u / u.norm()
        k[:, :, 0] = 2.0 * math.sqrt(d) * u
        q = 0.3 * q + tgt + 6.0 * u
    k = k + k_offset  # a large per-channel K mean (removed by smoothing)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _run_cuda(q, k, v, tau, **kw):
    opts = dict(scale=None, block_q=BQ, block_k=BK, sink_tokens=None, local_window=128, estimate="int8",
                quant_group="per_token", need_block_map=True, need_lse=True)
    opts.update(kw)
    _poison_allocator(q.numel() * q.element_size() * 4)
    return cuda_backend.sale_attention_cuda(q, k, v, tau, **opts)


def _run_ref(q, k, v, tau, *, scale=None, sink_tokens=None, local_window=128, quant_group="per_token"):
    d = q.shape[-1]
    return sale_attention_reference(
        q, k, v, tau, scale=1.0 / math.sqrt(d) if scale is None else scale, block_q=BQ, block_k=BK,
        sink_tokens=BK if sink_tokens is None else sink_tokens, local_window=local_window, estimate="int8",
        quant_group=quant_group, dense=False, need_block_map=True, need_lse=True)


def _brute_force(q, k, v, block_map, scale=None):
    """float64 causal attention over the keys of block_map [B,Hq,nQ,nK]; returns (out, lse)."""
    B, Hq, L, d = q.shape
    G = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty(B, Hq, L, d, dtype=torch.float64, device=q.device)
    lse = torch.empty(B, Hq, L, dtype=torch.float64, device=q.device)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    for b in range(B):
        for h in range(Hq):
            qq = q[b, h].double()
            kk = k[b, h // G].double()
            vv = v[b, h // G].double()
            m = block_map[b, h].repeat_interleave(BQ, 0)[:L].repeat_interleave(BK, 1)[:, :L] & causal
            z = (qq @ kk.T) * scale
            z = z.masked_fill(~m, -math.inf)
            lse[b, h] = torch.logsumexp(z, dim=-1)
            out[b, h] = torch.softmax(z, dim=-1) @ vv
    return out, lse


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _visible(L):
    nQ, nK = math.ceil(L / BQ), math.ceil(L / BK)
    qb = torch.arange(nQ)
    last = torch.clamp((qb + 1) * BQ, max=L) - 1
    return (torch.arange(nK)[None, :] * BK) <= last[:, None]


CASES = [
    # B, Hq, Hkv, L, d, dtype, structured, quant_group
    (2, 32, 8, 1337, 128, torch.bfloat16, False, "per_token"),
    (1, 9, 3, 1000, 64, torch.float16, True, "per_block"),
    (1, 8, 2, 4099, 128, torch.float16, True, "per_token"),
    (2, 4, 4, 2048, 64, torch.bfloat16, True, "per_block"),
]


@pytest.mark.parametrize("B,Hq,Hkv,L,d,dtype,structured,group", CASES)
def test_against_reference(B, Hq, Hkv, L, d, dtype, structured, group):
    q, k, v = _inputs(B, Hq, Hkv, L, d, dtype, structured=structured, seed=L + Hq, k_offset=0.5)
    tau = torch.tensor([[0.0, 0.0005, 0.004, 0.02][i % 4] for i in range(Hq)], device="cuda")
    out, lse, bmap, density, _ = _run_cuda(q, k, v, tau, quant_group=group)
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    assert torch.isfinite(lse).all(), "unwritten or non-finite lse"

    vis = _visible(L).to("cuda")
    assert not (bmap & ~vis).any(), "block outside the causal range"
    # tau == 0 heads are dense
    dense_heads = tau == 0
    assert bmap[:, dense_heads].eq(vis).all()

    # exact attention on the kernel's own block map
    ref_o, ref_lse = _brute_force(q, k, v, bmap)
    tol = 1e-2 if dtype == torch.bfloat16 else 5e-3
    err = _rel(out, ref_o)
    assert err < tol, f"output rel err {err}"
    assert (lse.double() - ref_lse).abs().max().item() < 2e-3 * max(1.0, ref_lse.abs().max().item())

    # the reference's selection: all but a tiny fraction of borderline blocks
    r_out, r_lse, r_map, r_density = _run_ref(q, k, v, tau, quant_group=group)
    nvis = vis.sum().item() * B * Hq
    diff = (bmap != r_map).sum().item()
    assert diff <= max(2, 2e-3 * nvis), f"{diff} of {nvis} visible blocks differ from the reference"
    assert torch.allclose(density, r_density, atol=2e-3)
    if diff == 0:
        assert _rel(out, r_out) < tol
        assert (lse - r_lse).abs().max().item() < 2e-3 * max(1.0, r_lse.abs().max().item())
    # the threshold actually prunes something on peaked data
    if structured:
        assert (density[:, tau >= 0.004] < 1).all(), density


@pytest.mark.parametrize("L,d,dtype", [(1000, 64, torch.bfloat16), (2500, 128, torch.float16)])
def test_tau_zero_is_dense(L, d, dtype):
    q, k, v = _inputs(1, 6, 2, L, d, dtype, seed=7)
    tau = torch.zeros(6, device="cuda")
    out, lse, bmap, density, _ = _run_cuda(q, k, v, tau)
    assert bmap.eq(_visible(L).to("cuda")).all()
    assert torch.allclose(density, torch.ones_like(density))
    G = 3
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1), is_causal=True)
    assert _rel(out, dense) < (1e-2 if dtype == torch.bfloat16 else 5e-3)


@pytest.mark.parametrize("sink,window", [(0, 0), (100, 300), (1, 64)])
def test_runtime_sink_and_window(sink, window):
    L = 3000
    q, k, v = _inputs(1, 4, 2, L, 128, torch.bfloat16, structured=True, seed=sink + window)
    tau = torch.full((4,), 0.01, device="cuda")
    out, lse, bmap, density, _ = _run_cuda(q, k, v, tau, sink_tokens=sink, local_window=window)
    _, _, r_map, _ = _run_ref(q, k, v, tau, sink_tokens=sink, local_window=window)
    nvis = _visible(L).sum().item() * 4
    assert (bmap != r_map).sum().item() <= max(2, 2e-3 * nvis)
    ref_o, _ = _brute_force(q, k, v, bmap)
    assert _rel(out, ref_o) < 1e-2


def test_timings_and_repeatability():
    q, k, v = _inputs(1, 8, 2, 4096, 128, torch.bfloat16, structured=True, seed=3)
    tau = torch.full((8,), 0.004, device="cuda")
    o1, l1, m1, d1, t = cuda_backend.sale_attention_cuda(
        q, k, v, tau, scale=None, block_q=64, block_k=32, sink_tokens=None, local_window=128, estimate="int8",
        quant_group="per_token", need_block_map=True, need_lse=False, timing=True)
    assert l1 is None and set(t) == {"quant", "select", "compute"} and all(x >= 0 for x in t.values())
    o2, _, m2, _, _ = _run_cuda(q, k, v, tau)
    assert torch.equal(m1, m2) and torch.equal(o1, o2), "non-deterministic result"


def test_unsupported_configurations_raise():
    q, k, v = _inputs(1, 4, 2, 256, 128, torch.bfloat16)
    tau = torch.full((4,), 0.01, device="cuda")
    with pytest.raises(ValueError, match="block_k"):
        _run_cuda(q, k, v, tau, block_k=64)
    with pytest.raises(ValueError, match="block_q"):
        _run_cuda(q, k, v, tau, block_q=128)
    with pytest.raises(ValueError, match="estimate"):
        _run_cuda(q, k, v, tau, estimate="int4")
    with pytest.raises(ValueError, match="head_dim"):
        q2, k2, v2 = _inputs(1, 4, 2, 256, 96, torch.bfloat16)
        _run_cuda(q2, k2, v2, tau)
    with pytest.raises(ValueError, match="Lq == Lk"):
        _run_cuda(q[:, :, :128], k, v, tau)
    with pytest.raises(ValueError):
        _run_cuda(q.float(), k.float(), v.float(), tau)
