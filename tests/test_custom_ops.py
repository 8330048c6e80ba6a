"""The CUDA passes as torch.library custom ops: registered, and shape-correct fake (meta) implementations, so
torch.compile and export can trace through them. Runs on CPU (meta tensors)."""

from __future__ import annotations

import math

import pytest
import torch

from sale_cli.kernels import cuda_backend, sale_attention


@pytest.mark.parametrize("bits,d", [(8, 128), (4, 128), (4, 64)])
def test_fake_shapes(bits, d):
    B, Hq, Hkv, L = 2, 9, 3, 1000
    q = torch.empty(B, Hq, L, d, device="meta", dtype=torch.bfloat16)
    k = torch.empty(B, Hkv, L, d, device="meta", dtype=torch.bfloat16)
    kint, sk, qint, sq, qm, qkm = torch.ops.sale.quantize(q, k, False, bits, 0.1)
    ib = d if bits == 8 else d // 2
    assert kint.shape == (B, Hkv, 1024, ib) and qint.shape == (B, Hq, 1024, ib) and kint.dtype == torch.int8
    assert sk.shape == (B, Hkv, 1024) and sq.shape == qm.shape == qkm.shape == (B, Hq, 1024)
    tau = torch.empty(Hq, device="meta")
    bits_map, pairs = torch.ops.sale.select(q, k, qint, sq, kint, sk, qm, qkm, tau, 0.1, 32, 128)
    assert bits_map.shape == (B, Hq, 16, 1) and bits_map.dtype == torch.int32 and pairs.shape == (B, Hq)
    out, lse = torch.ops.sale.compute(q, k, k, bits_map, 0.1, True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (B, Hq, L)
    _, no_lse = torch.ops.sale.compute(q, k, k, bits_map, 0.1, False)
    assert no_lse.numel() == 0


def test_bad_compute_and_stop_after_are_named():
    q = torch.randn(1, 2, 64, 64)
    tau = torch.zeros(2)
    opts = dict(scale=None, block_q=64, block_k=32, sink_tokens=None, local_window=128, estimate="int8",
                quant_group="per_token", need_block_map=False, need_lse=False)
    with pytest.raises(ValueError, match="compute"):
        cuda_backend.sale_attention_cuda(q, q, q, tau, compute="triton", **opts)
    with pytest.raises(ValueError, match="stop_after"):
        cuda_backend.sale_attention_cuda(q, q, q, tau, stop_after="compute", **opts)
    with pytest.raises(ValueError, match="compute"):
        sale_attention(q, q, q, tau, compute="triton")


def test_selection_chunks_bound_the_workspace():
    chunks = cuda_backend._selection_chunks
    assert chunks(1, 32, 8, 16384, 128, "int8") == [(0, 1, 0, 8)]  # fits: one call, as before
    # Llama-3.1-8B shapes at 128K: one kv head (4 query heads) per chunk, about 87 MiB of int8 copies each
    got = chunks(1, 32, 8, 131072, 128, "int8")
    assert got == [(0, 1, h, h + 1) for h in range(8)]
    assert chunks(1, 32, 8, 131072, 128, "int4") == [(0, 1, h, h + 2) for h in range(0, 8, 2)]
    for B, Hq, Hkv, L, d, est, budget in [(3, 12, 4, 5000, 64, "int8", 3 << 20), (2, 9, 3, 777, 128, "int4", 1),
                                          (1, 16, 16, 70000, 128, "int8", 200 << 20)]:  # fmt: skip
        got = chunks(B, Hq, Hkv, L, d, est, budget)
        covered = sorted((b, h) for b0, b1, h0, h1 in got for b in range(b0, b1) for h in range(h0, h1))
        assert covered == [(b, h) for b in range(B) for h in range(Hkv)]  # every (batch, kv head) exactly once
        G, Lpad, ib = Hq // Hkv, -(-L // 64) * 64, d // 2 if est == "int4" else d
        for b0, b1, h0, h1 in got:
            n = (b1 - b0) * (h1 - h0)
            assert n == 1 or n * Lpad * (ib * (G + 1) + 12 * G) <= budget


def test_fake_shapes_of_a_chunk():
    """Lq < Lk: query-side buffers Lq long (padded to 64), key-side Lk long; the bitmap has nQ of Lq rows and the
    words of nK of Lk; lse [B, Hq, Lq]."""
    B, Hq, Hkv, Lq, Lk, d = 1, 8, 2, 100, 3000, 128
    q = torch.empty(B, Hq, Lq, d, device="meta", dtype=torch.float16)
    k = torch.empty(B, Hkv, Lk, d, device="meta", dtype=torch.float16)
    kint, sk, qint, sq, qm, qkm = torch.ops.sale.quantize(q, k, True, 8, 0.1)
    assert kint.shape == (B, Hkv, 3008, d) and sk.shape == (B, Hkv, 3008) and qm.shape == (B, Hq, 3008)
    assert qint.shape == (B, Hq, 128, d) and sq.shape == qkm.shape == (B, Hq, 128)
    bits_map, pairs = torch.ops.sale.select(q, k, qint, sq, kint, sk, qm, qkm, torch.empty(Hq, device="meta"), 0.1,
                                            32, 128)
    assert bits_map.shape == (B, Hq, 2, 3) and pairs.shape == (B, Hq)  # nK = 94 key blocks: 3 words
    out, lse = torch.ops.sale.compute(q, k, k, bits_map, 0.1, True)
    assert out.shape == q.shape and lse.shape == (B, Hq, Lq)


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 777), (64, 4160), (1000, 5000), (1337, 6001), (4099, 4099)])
def test_visible_pairs_match_the_reference(Lq, Lk):
    from sale_cli.kernels.reference import _block_ranges

    assert cuda_backend._visible_pairs(Lq, Lk, 64, 32) == int(_block_ranges(Lq, Lk, 64, 32, 32, 128)[0].sum())


def test_selection_chunks_of_a_chunk():
    """Lq < Lk: the query side is sized by Lq, the key side by Lk; Lk = L is the old formula."""
    chunks = cuda_backend._selection_chunks
    assert chunks(1, 32, 8, 16384, 128, "int8", Lk=16384) == chunks(1, 32, 8, 16384, 128, "int8")
    # a 16K chunk at the end of 128K tokens: more chunks than a 16K prefill, fewer than the whole 128K call
    n = len(chunks(1, 32, 8, 16384, 128, "int8", Lk=131072))
    assert 1 < n <= len(chunks(1, 32, 8, 131072, 128, "int8"))
    budget = 20 << 20
    for b0, b1, h0, h1 in chunks(2, 12, 4, 1000, 64, "int8", budget, Lk=9000):
        per_head = 1024 * 3 * (64 + 8) + 9024 * (64 + 4 * 3 + 4)
        assert (b1 - b0) * (h1 - h0) * per_head <= budget


def test_cuda_backend_checks_through_the_public_op():
    """Direct callers of the CUDA backend get the public op's argument messages, then its "why not"."""
    q = torch.randn(1, 2, 64, 64)
    opts = dict(scale=None, block_q=64, block_k=32, sink_tokens=None, local_window=128, estimate="int8",
                quant_group="per_token", need_block_map=False, need_lse=False)
    with pytest.raises(ValueError, match="thresholds must not contain NaN"):
        cuda_backend.sale_attention_cuda(q, q, q, torch.tensor([0.1, math.nan]), **opts)
    with pytest.raises(ValueError, match="thresholds must be >= 0"):
        cuda_backend.sale_attention_cuda(q, q, q, torch.tensor([0.1, -1.0]), **opts)
    with pytest.raises(ValueError, match=r"q length \(64\) must not exceed k length \(32\)"):
        cuda_backend.sale_attention_cuda(q, q[:, :, :32], q[:, :, :32], torch.zeros(2), **opts)
    with pytest.raises(ValueError, match="the CUDA backend does not support this call: q is not a CUDA tensor"):
        cuda_backend.sale_attention_cuda(q, q, q, torch.zeros(2), **opts)
