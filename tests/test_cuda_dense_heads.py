"""The public op on CUDA routes dense heads to SDPA (docs/SPEC.md section 7: a tau-0 head is exact attention).

Kv groups whose every query head has tau 0 run through SDPA, the others through the SALE kernels; a call whose
heads are all dense (or a short input) that asks only for the density runs SDPA alone. The routed result must
equal the kernel path (forced with return_lse) on the sparse heads, be exact attention (float64 oracle) on the
dense ones, and report density 1 for them. Skipped without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import test_cuda_kernel as K  # noqa: E402  (the shared structured inputs)

from sale_cli.kernels import sale_attention  # noqa: E402


def _oracle(q, k, v):
    G = q.shape[1] // k.shape[1]
    kk, vv = (x.double().repeat_interleave(G, dim=1) for x in (k, v))
    s = q.double() @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5
    L = q.shape[2]
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return s.softmax(-1) @ vv


@pytest.mark.parametrize("Hq,Hkv,dense_groups", [(32, 8, (0, 3, 7)), (9, 3, (1,)), (8, 2, (0, 1))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_groups_go_to_sdpa(Hq, Hkv, dense_groups, dtype):
    q, k, v = K._inputs(1, Hq, Hkv, 4096 + 77, 128, dtype, seed=11)
    G = Hq // Hkv
    tau = torch.full((Hq,), 0.004, device="cuda")
    tau[torch.tensor([g * G + i for g in dense_groups for i in range(G)], device="cuda")] = 0
    routed = sale_attention(q, k, v, tau, return_density=True, return_timings=True)
    kernel = sale_attention(q, k, v, tau, return_density=True, return_lse=True)  # lse keeps the kernel path
    dense = (tau == 0).cpu()
    assert routed.out.dtype == dtype and routed.out.shape == q.shape
    assert ("dense" in routed.timings) == bool(dense.view(Hkv, G).all(1).any())
    assert torch.equal(routed.density[0].cpu()[dense], torch.ones(int(dense.sum())))
    torch.testing.assert_close(routed.density.cpu()[:, ~dense], kernel.density.cpu()[:, ~dense])
    # sparse heads: the same kernels on the same inputs (K/V of their groups only: smoothing is per kv head)
    torch.testing.assert_close(routed.out[:, ~dense.cuda()], kernel.out[:, ~dense.cuda()], rtol=0, atol=0)
    exact = _oracle(q, k, v)
    err = (routed.out.double() - exact)[:, dense.cuda()].abs().max().item()
    assert err < (2e-2 if dtype == torch.bfloat16 else 4e-3), err


def test_all_dense_density_only_is_sdpa():
    q, k, v = K._inputs(1, 8, 2, 3000, 64, torch.bfloat16, seed=3)
    tau = torch.zeros(8, device="cuda")
    res = sale_attention(q, k, v, tau, return_density=True, return_timings=True)
    assert set(res.timings) == {"dense"} and torch.equal(res.density.cpu(), torch.ones(1, 8))
    plain = sale_attention(q, k, v, tau)
    torch.testing.assert_close(res.out, plain, rtol=0, atol=0)
    short = sale_attention(q[:, :, :512], k[:, :, :512], v[:, :, :512], torch.full((8,), 0.01, device="cuda"),
                           return_density=True)
    assert short.block_map is None and torch.equal(short.density.cpu(), torch.ones(1, 8))
