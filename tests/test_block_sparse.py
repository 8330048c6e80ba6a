"""Block maps, bitmaps, block lists and the FlexAttention computation pass (kernels/block_sparse.py), on CPU."""

from __future__ import annotations

import math

import pytest
import torch

from sale_cli.kernels import block_sparse as bs
from sale_cli.kernels.reference import sale_attention_reference


def _random_map(B, H, nQ, nK, p, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, H, nQ, nK, generator=g) < p


@pytest.mark.parametrize("nK", [1, 31, 32, 33, 100])
def test_bits_round_trip(nK):
    m = _random_map(2, 3, 5, nK, 0.4, nK)
    m[..., -1] = True  # the top bit of a full word (sign bit of int32)
    bits = bs.block_map_to_bits(m)
    assert bits.dtype == torch.int32 and bits.shape == (2, 3, 5, math.ceil(nK / 32))
    assert torch.equal(bs.bits_to_block_map(bits, nK), m)


def test_kv_block_lists_ascending_and_counted():
    m = _random_map(1, 2, 7, 45, 0.3, 1)
    num, idx = bs.kv_block_lists(m)
    assert num.dtype == torch.int32 and idx.dtype == torch.int32
    assert idx.shape[-1] == int(num.max())
    for h in range(2):
        for r in range(7):
            want = torch.nonzero(m[0, h, r]).flatten().int()
            n = int(num[0, h, r])
            assert n == want.numel()
            assert torch.equal(idx[0, h, r, :n], want)
            assert (idx[0, h, r, n:] == 0).all()
    _, wide = bs.kv_block_lists(m, full_width=True)
    assert wide.shape[-1] == 45


def test_coarsen_is_or_pooling():
    m = _random_map(1, 2, 9, 37, 0.1, 2)
    c = bs.coarsen_block_map(m, 2, 4)
    assert c.shape == (1, 2, 5, 10)
    for i in range(5):
        for j in range(10):
            assert c[0, :, i, j].tolist() == m[0, :, 2 * i:2 * i + 2, 4 * j:4 * j + 4].flatten(1).any(1).tolist()


def test_full_blocks_need_no_causal_mask():
    L, bq, bk = 300, 64, 32
    full = bs._full_blocks(L, bq, bk, "cpu")
    vis = bs.visible_block_map(L, bq, bk)
    assert not (full & ~vis).any()
    for qb in range(full.shape[0]):
        for kb in range(full.shape[1]):
            rows = range(qb * bq, min(L, (qb + 1) * bq))
            keys = range(kb * bk, min(L, (kb + 1) * bk))
            all_visible = all(k <= r for r in rows for k in keys)
            assert bool(full[qb, kb]) == all_visible


@pytest.mark.parametrize("L,Hq,Hkv,d", [(777, 4, 2, 64), (1100, 6, 3, 128)])
def test_flex_matches_reference_on_its_map(L, Hq, Hkv, d):
    g = torch.Generator().manual_seed(L)
    q = torch.randn(1, Hq, L, d, generator=g)
    k = torch.randn(1, Hkv, L, d, generator=g)
    v = torch.randn(1, Hkv, L, d, generator=g)
    k[:, :, 0] = 4 * q.mean((1, 2))[:, None]  # a sink: peaked attention, so selection prunes
    tau = torch.tensor([0.0, 0.01, 0.05, 1e9, 0.001, 0.02][:Hq])
    out, lse, bm, dens = sale_attention_reference(
        q, k, v, tau, scale=1 / math.sqrt(d), block_q=64, block_k=32, sink_tokens=32, local_window=128,
        estimate="int8", quant_group="per_token", dense=False, need_block_map=True, need_lse=True)
    assert (dens[0, 1:] < 1).any(), "the test needs a sparse map"
    assert torch.allclose(bs.map_density(bm, L, 64, 32), dens)
    o2, l2 = bs.flex_block_sparse_attention(q, k, v, bm, block_q=64, block_k=32, return_lse=True)
    assert (o2 - out).abs().max().item() < 1e-4
    assert (l2 - lse).abs().max().item() < 1e-4
    # a coarser map (128 x 64) computes a superset of the keys: denser, still a valid causal attention
    c = bs.coarsen_block_map(bm, 2, 2)
    assert (bs.map_density(c, L, 128, 64) >= dens - 1e-6).all()
    o3 = bs.flex_block_sparse_attention(q, k, v, c, block_q=128, block_k=64)
    assert o3.shape == q.shape and torch.isfinite(o3).all()


@pytest.mark.parametrize("Lq,Lk,Hq,Hkv", [(300, 1111, 4, 2), (64, 700, 2, 1), (1, 500, 2, 2)])
def test_flex_with_an_offset_matches_reference(Lq, Lk, Hq, Hkv):
    """Lq < Lk (a chunk): bottom-right causal mask over the reference's own map, and the full blocks with it."""
    d = 64
    g = torch.Generator().manual_seed(Lk)
    q = torch.randn(1, Hq, Lq, d, generator=g)
    k = torch.randn(1, Hkv, Lk, d, generator=g)
    v = torch.randn(1, Hkv, Lk, d, generator=g)
    k[:, :, 0] = 4 * q.mean((1, 2))[:, None]
    tau = torch.tensor([0.0, 1e9, 0.05, 0.01][:Hq])
    out, lse, bm, dens = sale_attention_reference(
        q, k, v, tau, scale=1 / math.sqrt(d), block_q=64, block_k=32, sink_tokens=32, local_window=128,
        estimate="int8", quant_group="per_token", dense=False, need_block_map=True, need_lse=True)
    assert (dens[0, 1:] < 1).any(), "the test needs a sparse map"
    o2, l2 = bs.flex_block_sparse_attention(q, k, v, bm, block_q=64, block_k=32, return_lse=True)
    assert (o2 - out).abs().max().item() < 1e-4
    assert (l2 - lse).abs().max().item() < 1e-4
    full = bs._full_blocks(Lq, 64, 32, "cpu", Lk)
    off = Lk - Lq
    for qb in range(full.shape[0]):
        for kb in range(full.shape[1]):
            assert bool(full[qb, kb]) == ((kb + 1) * 32 - 1 <= qb * 64 + off), (qb, kb)
    with pytest.raises(ValueError, match="Lq"):
        bs.flex_block_sparse_attention(k, q[:, :Hkv], q[:, :Hkv], bm, block_q=64, block_k=32)
