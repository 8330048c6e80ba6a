"""The CUDA passes as torch.library custom ops: registered, and shape-correct fake (meta) implementations, so
torch.compile and export can trace through them. Runs on CPU (meta tensors)."""

from __future__ import annotations

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
