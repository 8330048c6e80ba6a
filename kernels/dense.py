"""Exact dense causal attention through SDPA, the queries being the last Lq of the Lk positions (bottom-right).

The one owner of the project's dense attention: the op's dense path (``causal_sdpa``), the runner's probed
dense attention (``sdpa`` with the backend and variant its probes chose) and bench-op's SDPA rows all call it.
SDPA's ``is_causal=True`` aligns the mask top-left when Lq != Lk, so chunks (1 < Lq < Lk) take a lower-right
bias, an explicit mask or two cuDNN calls instead.
"""

from __future__ import annotations

import torch
from torch.nn.attention.bias import causal_lower_right

# the chunk variants of ``sdpa``'s backend argument, besides the names of torch's SDPBackend members
CHUNK_VARIANTS = ("LOWER_RIGHT", "MASK", "SPLIT")


def bottom_right_mask(Lq: int, Lk: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool [Lq, Lk], True where query row i may see key j: j <= i + (Lk - Lq)."""
    return torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril(Lk - Lq)


def sdpa(q, k, v, scale=None, backend: str | None = None, repeat_kv: bool = False, *,
         enable_gqa: bool | None = None) -> torch.Tensor:
    """Causal SDPA with the queries as the last Lq of the Lk positions; q [B, Hq, Lq, d], k, v [B, Hkv, Lk, d].

    ``backend``: None (torch picks), an SDPBackend member name (pins it for square calls), or for chunks
    (1 < Lq < Lk) "LOWER_RIGHT" (torch's lower-right causal bias, which picks its own fused kernel), "MASK" (an
    explicit boolean mask) or "SPLIT" (``split_cudnn``); a chunk otherwise gets the mask. ``repeat_kv`` repeats K
    and V per query head instead of SDPA's GQA; ``enable_gqa`` overrides the default (heads differ and K/V are not
    repeated).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    Lq, Lk = q.shape[2], k.shape[2]
    G = q.shape[1] // k.shape[1]
    if backend == "SPLIT" and 1 < Lq < Lk:
        return split_cudnn(q, k, v, scale)
    if repeat_kv and G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    mask, causal, variant = None, Lq > 1, backend
    if backend in CHUNK_VARIANTS:
        backend = None
    if 1 < Lq < Lk:  # a chunk: SDPA's is_causal would align the mask top-left
        mask = causal_lower_right(Lq, Lk) if variant == "LOWER_RIGHT" else bottom_right_mask(Lq, Lk, q.device)
        causal, backend = False, None
    gqa = G > 1 and not repeat_kv if enable_gqa is None else enable_gqa
    kwargs = dict(attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
    if backend is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)


def split_cudnn(q, k, v, scale):
    """A chunk (1 < Lq < Lk) as two cuDNN attention calls merged by their log-sum-exp: every row sees all of the
    prefix [0, Lk - Lq) (no mask) and the last Lq keys causally (a square call, where top-left is bottom-right).
    cuDNN takes no bottom-right mask, and the lower-right bias runs the slower flash kernel on Hopper. Private
    aten op: the runner's chunk probe checks its output against the explicit mask before it is ever used."""
    op = torch.ops.aten._scaled_dot_product_cudnn_attention
    B, H, Lq, _ = q.shape
    off, G = k.shape[2] - Lq, H // k.shape[1]
    parts = []
    for keys, values, causal in ((k[:, :, :off], v[:, :, :off], False), (k[:, :, off:], v[:, :, off:], True)):
        if G > 1:
            keys, values = keys.repeat_interleave(G, dim=1), values.repeat_interleave(G, dim=1)
        out, lse = op(q, keys.contiguous(), values.contiguous(), None, True, 0.0, causal, False, scale=scale)[:2]
        parts.append((out.float(), lse.float().reshape(B, H, Lq, 1)))
    (o1, l1), (o2, l2) = parts
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    return ((o1 * w1 + o2 * w2) / (w1 + w2)).to(q.dtype)


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Exact bottom-right causal attention without probing (the op's dense path): square calls (Lq == Lk) and
    single query rows take SDPA's own choice; a chunk on CUDA torch's lower-right causal bias (flash or
    memory-efficient kernels where they apply), or the explicit boolean mask where that bias is refused."""
    Lq, Lk = q.shape[2], k.shape[2]
    if q.is_cuda and 1 < Lq < Lk:
        try:
            return sdpa(q, k, v, scale, "LOWER_RIGHT")
        except RuntimeError:  # a fused kernel that takes the bias but not this GQA layout
            pass
    return sdpa(q, k, v, scale, "MASK")
