"""data/synthetic_qkv.py on the CPU: bench-op's inputs stay the same for a seed, the kernel tests' spread variant
has the advertised logits, and the options only add to the default draws."""

import math

import pytest
import torch

from sale_cli.data.synthetic_qkv import HEAVY_FRACTIONS, make_inputs, random_qkv, structured_qkv


def _logits(q, k):
    groups = q.shape[1] // k.shape[1]
    return q.double() @ k.double().repeat_interleave(groups, 1).transpose(-1, -2) / math.sqrt(q.shape[-1])


def test_default_values_are_pinned():
    """bench-op's figures compare across commits only while its inputs stay the same: sums of this seed's tensors
    (CPU generator) as the generator produced them when bench-op's tables were measured."""
    q, k, v = make_inputs("structured", 256, 4, 2, 64, torch.float32, seed=5, device="cpu")
    sums = [float(t.double().sum()) for t in (q, k, v)]
    assert sums == pytest.approx([493.2709, -182.0889, -197.7402], abs=2e-3)
    q, k, v = make_inputs("random", 128, 2, 1, 16, torch.float32, seed=5, device="cpu")
    assert [float(t.double().sum()) for t in (q, k, v)] == pytest.approx([16.3632, -57.1163, -90.9079], abs=2e-3)


def test_spread_variant_has_a_sink_and_heavy_logits_across_the_thresholds():
    L, d = 2048, 64
    q, k, v = structured_qkv(L, 8, 2, d, torch.float32, seed=3, device="cpu", batch=2, spread=True)
    assert q.shape == (2, 8, L, d) and k.shape == v.shape == (2, 2, L, d)
    z = _logits(q, k)
    sink = z[..., 0]
    assert abs(sink.mean().item() - 10) < 0.1 and sink.std().item() < 1
    # heavy keys: the logits along w, 2.5-10, straddle the thresholds 10 + ln tau for tau 0.001 .. 0.008
    heavy = z[..., 1:][z[..., 1:] > 2.5]
    for tau in (0.001, 0.004, 0.008):
        thr = 10 + math.log(tau)
        assert ((heavy > thr - 1) & (heavy < thr)).sum() > 100 and ((heavy > thr) & (heavy < thr + 1)).sum() > 100
    default = _logits(*structured_qkv(L, 8, 2, d, torch.float32, seed=3, device="cpu")[:2])
    assert (default[..., 0] - 10).abs().max().item() < 1e-3  # the default sink logit is 10 in every row


def test_heavy_keys_per_kv_head_and_k_offset_is_a_per_channel_constant():
    L, d, bk = 4096, 64, 32
    q, k, v = structured_qkv(L, 4, 4, d, torch.float32, seed=1, device="cpu")
    for h, frac in enumerate(HEAVY_FRACTIONS):  # heavy keys: logits well above the background in most rows
        strong = (_logits(q[:, h:h + 1], k[:, h:h + 1])[0, 0, L // 2:, 1:] > 5).float().mean(0) > 0.5
        assert int(frac * L / bk * 0.8) <= strong.sum().item() <= int(frac * L / bk), (h, strong.sum())
    q2, k2, v2 = structured_qkv(L, 4, 4, d, torch.float32, seed=1, device="cpu", k_offset=1.0)
    assert torch.equal(q2, q) and torch.equal(v2, v)
    shift = k2 - k
    assert torch.allclose(shift, shift[:, :, :1].expand_as(shift), atol=1e-5) and shift.abs().max() > 0.1
    rq, rk, rv = random_qkv(L, 4, 2, d, torch.float32, seed=1, device="cpu", k_offset=2.0)
    assert torch.equal(rq, random_qkv(L, 4, 2, d, torch.float32, seed=1, device="cpu")[0])


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="one of structured, random"):
        make_inputs("peaked", 64, 2, 1, 16, torch.float32, seed=0, device="cpu")
