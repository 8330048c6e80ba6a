"""The project's own CUDA SALE kernels: JIT build (torch.utils.cpp_extension.load, cached) and the entry point.

Three passes, each a kernel launch on the current stream (sources in ``kernels/csrc``):

1. quant:   per-channel means of K (per kv head) and Q (per query head), symmetric int8 quantization of the
            smoothed Q and K (per_token or per_block steps, round half to even), qm_j = q_mean . k_smooth_j and
            c_i = scale * q_i . k_mean (the logit shift of smoothing K).
2. select:  exact fp32 m_i, l_i over the sink+local set R, then the int8 estimate (wgmma s8 on sm_90a, mma.sync
            s8 elsewhere) of every other causally visible 32-key block; a bitmap of the blocks to compute per
            (b, hq, 64-row query block).
            One CTA per (b, query block, up to 4 query heads of a kv group): each int8 K tile serves all its
            heads, cheap prefilter before the exact reference-order test.
3. compute: FlashAttention-2 style block-sparse causal attention over the bitmap (fp16/bf16 mma, fp32
            accumulation); the softmax is invariant to the smoothing shift, so the original K is used and the
            lse is that of the original logits (as in the reference); the O accumulator is rescaled only when
            some row max of the warp moved.

One kernel per pass (sale_quant.cu, sale_select.cu, sale_compute.cu); docs/PERF_KERNEL_NOTES.md has the history.

Supported: fp16/bf16, Lq == Lk, head_dim 64 or 128, block_q=64, block_k=32, estimate="int8", GQA with up to 16
query heads per kv head. Anything else raises ValueError.
"""

from __future__ import annotations

import math
import os
import threading

import torch

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_SOURCES = ("binding.cpp", "sale_quant.cu", "sale_select.cu", "sale_compute.cu")
_lock = threading.Lock()
_module = None
_load_error: str | None = None


def _arch_flag() -> str:
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) == (9, 0):
        return "-gencode=arch=compute_90a,code=sm_90a"
    if major < 8:
        raise RuntimeError(f"SALE CUDA kernels need compute capability >= 8.0 (mma.sync bf16/s8), got {major}.{minor}")
    return f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"


def _load():
    """Build (first call) and import the extension; cached per process, and on disk by torch."""
    global _module, _load_error
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        from torch.utils.cpp_extension import load

        arch = _arch_flag()
        tag = arch.split("code=")[-1]
        verbose = os.environ.get("SALE_CUDA_VERBOSE", "0") == "1"
        try:
            _module = load(
                name=f"sale_cuda_{tag}",
                sources=[os.path.join(_CSRC, s) for s in _SOURCES],
                extra_include_paths=[_CSRC],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "-lineinfo", arch],
                verbose=verbose,
            )
        except Exception as exc:  # keep the reason for available()
            _load_error = f"building the SALE CUDA extension failed: {exc}"
            raise
    return _module


def available() -> tuple[bool, str]:
    """(True, "available") if the CUDA kernels can run here, else (False, reason)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    if torch.version.cuda is None:
        return False, "this torch build has no CUDA support"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return False, "SALE CUDA kernels need compute capability >= 8.0"
    if _load_error is not None:
        return False, _load_error
    try:
        _load()
    except Exception as exc:
        return False, f"building the SALE CUDA extension failed: {exc}"
    return True, "available"


def supports(q: torch.Tensor, k: torch.Tensor, *, block_q: int, block_k: int, estimate: str) -> tuple[bool, str]:
    """Whether this backend can run a call of these shapes and options (``auto`` falls back to the reference)."""
    if not q.is_cuda:
        return False, "q is not a CUDA tensor"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False, f"dtype {q.dtype} (the CUDA kernels take float16 or bfloat16)"
    if q.shape[-1] not in (64, 128):
        return False, f"head_dim {q.shape[-1]} (the CUDA kernels take 64 or 128)"
    if q.shape[1] // k.shape[1] > 16:
        return False, f"{q.shape[1] // k.shape[1]} query heads per kv head (the CUDA kernels take at most 16)"
    if (block_q, block_k) != (64, 32):
        return False, f"block_q={block_q}, block_k={block_k} (the CUDA kernels take 64 and 32)"
    if estimate != "int8":
        return False, f"estimate={estimate!r} (the CUDA kernels implement 'int8'; use backend='reference')"
    return True, "supported"


def _validate(q, k, v, thresholds, block_q, block_k, sink_tokens, local_window, estimate, quant_group):
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        raise ValueError("the CUDA backend needs q, k, v on a CUDA device")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the CUDA backend takes float16 or bfloat16 q/k/v of one dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape != v.shape:
        raise ValueError("q must be [B, Hq, L, d] and k, v [B, Hkv, L, d]")
    B, Hq, Lq, d = q.shape
    if k.shape[0] != B or k.shape[3] != d:
        raise ValueError("k/v batch and head_dim must match q")
    if k.shape[2] != Lq:
        raise ValueError(f"the CUDA backend needs Lq == Lk (prefill), got Lq={Lq}, Lk={k.shape[2]}")
    if d not in (64, 128):
        raise ValueError(f"head_dim {d} is not supported by the CUDA backend (64 or 128)")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if Hq // Hkv > 16:
        raise ValueError(f"the CUDA backend supports at most 16 query heads per kv head, got {Hq // Hkv}")
    if block_q != 64:
        raise ValueError(f"block_q={block_q} is not supported by the CUDA backend (only block_q=64)")
    if block_k != 32:
        raise ValueError(f"block_k={block_k} is not supported by the CUDA backend (only block_k=32)")
    if estimate != "int8":
        raise ValueError(f"estimate={estimate!r} is not supported by the CUDA backend (only 'int8'; "
                         "'int4' and 'none' are in the reference backend)")
    if quant_group not in ("per_token", "per_block"):
        raise ValueError(f"quant_group must be 'per_token' or 'per_block', got {quant_group!r}")
    if sink_tokens < 0 or local_window < 0:
        raise ValueError("sink_tokens and local_window must be >= 0")
    if thresholds.shape != (Hq,):
        raise ValueError(f"thresholds must have shape [{Hq}]")
    if Lq >= 2**31 // 2 or B * Hq * Lq * d >= 2**62:
        raise ValueError("input too large for the CUDA backend")


def _visible_pairs(L: int, block_q: int, block_k: int) -> int:
    """Causally visible (query block, key block) pairs of one head (Lq == Lk)."""
    nQ = math.ceil(L / block_q)
    return sum((min((qb + 1) * block_q, L) - 1) // block_k + 1 for qb in range(nQ))


def bits_to_block_map(bits: torch.Tensor, nK: int) -> torch.Tensor:
    """[B, Hq, nQ, nW] int32 bitmaps -> bool [B, Hq, nQ, nK] (bit kb of word kb // 32)."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    unpacked = (bits.unsqueeze(-1) >> shifts) & 1
    return unpacked.flatten(-2)[..., :nK].bool()


def sale_attention_cuda(q, k, v, thresholds, *, scale, block_q, block_k, sink_tokens, local_window, estimate,
                        quant_group, need_block_map, need_lse, timing: bool = False):
    """SALE attention with the CUDA kernels.

    Returns (out, lse or None, block_map or None, density [B, Hq] fp32, timings dict or None); timings (ms per
    stage: "quant", "select", "compute", from CUDA events) only when ``timing`` is True.
    """
    if sink_tokens is None:
        sink_tokens = block_k
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    _validate(q, k, v, thresholds, block_q, block_k, sink_tokens, local_window, estimate, quant_group)
    tau = thresholds.detach().to(device=q.device, dtype=torch.float32).contiguous()
    if bool(torch.isnan(tau).any()) or bool((tau < 0).any()):
        raise ValueError("thresholds must be >= 0 and not NaN")
    mod = _load()
    q = q.contiguous()
    k = k.contiguous()
    v = v.contiguous()
    B, Hq, L, d = q.shape
    nK = math.ceil(L / block_k)
    per_block = 1 if quant_group == "per_block" else 0
    scale = float(scale)

    events = None
    if timing:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        events[0].record()
    kint, sk, qint, sq, qm, qkm = mod.quantize(q, k, per_block, scale)
    if timing:
        events[1].record()
    bits, pairs = mod.select(q, k, qint, sq, kint, sk, qm, qkm, tau, scale, int(sink_tokens), int(local_window))
    if timing:
        events[2].record()
    out, lse = mod.compute(q, k, v, bits, scale, bool(need_lse))
    timings = None
    if timing:
        events[3].record()
        events[3].synchronize()
        timings = {
            "quant": events[0].elapsed_time(events[1]),
            "select": events[1].elapsed_time(events[2]),
            "compute": events[2].elapsed_time(events[3]),
        }
    density = pairs.float() / float(_visible_pairs(L, block_q, block_k))
    block_map = bits_to_block_map(bits, nK) if need_block_map else None
    return out, (lse if need_lse else None), block_map, density, timings
