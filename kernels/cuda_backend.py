"""The project's own CUDA SALE kernels: JIT build (torch.utils.cpp_extension.load, cached) and the entry point.

Three passes, each a kernel launch on the current stream (sources in ``kernels/csrc``):

1. quant:   per-channel means of K (per kv head) and Q (per query head), symmetric int8 or int4 quantization
            of the smoothed Q and K (per_token or per_block steps, round half to even; int4 packed two per
            byte), qm_j = q_mean . k_smooth_j and c_i = scale * q_i . k_mean (the logit shift of smoothing K).
2. select:  exact fp32 m_i, l_i over the sink+local set R, then the integer estimate (int8: wgmma s8 on sm_90a,
            mma.sync s8 elsewhere; int4: mma.sync m16n8k64 s4, native on sm_80/86/89, emulated and slow on
            sm_90) of every other causally visible 32-key block; a bitmap of the blocks to compute per
            (b, hq, 64-row query block): 32 MiB at 128K tokens and 32 heads (kernels/block_sparse.py converts it
            to FlexAttention's block lists).
            One CTA per (b, query block, up to 4 query heads of a kv group): each int8 K tile serves all its
            heads, cheap prefilter before the exact reference-order test.
3. compute: ``compute="cuda"``: block-sparse causal attention over the bitmap (fp16/bf16 tensor cores, fp32
            accumulation, online softmax): on sm_90a wgmma over 64-key tiles of two selected blocks in
            FlashAttention-3's intra-warpgroup order, elsewhere FlashAttention-2 style mma.sync over 32-key tiles
            (the O accumulator rescaled only when some row max of the warp moved). The softmax is invariant to the
            smoothing shift, so the original K is used and the lse is that of the original logits (as in the
            reference). ``compute="flex"``: torch's FlexAttention over the same blocks (kernels/block_sparse.py).
            ``"auto"``: the faster one measured on this GPU architecture (``default_compute``).

One kernel per pass (sale_quant.cu, sale_select.cu, sale_compute.cu), each registered as a torch.library custom
op (``torch.ops.sale.quantize`` / ``select`` / ``compute``); docs/history/PERF_KERNEL_NOTES.md has the history.

Chunks (``Lq < Lk``, docs/SPEC.md): the queries are the last ``Lq`` of the ``Lk`` positions
(bottom-right causal); each pass takes the offset ``Lk - Lq`` as a runtime value: K's statistics run over the Lk
keys and Q's over the Lq rows, query blocks count from the call's first row and key blocks (R, visibility, the
bitmap's columns) absolutely.

Supported: fp16/bf16, 1 <= Lq <= Lk, head_dim 64 or 128, block_q=64, block_k=32, estimate "int8" or "int4", GQA with
up to 16 query heads per kv head. Anything else raises ValueError.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading

import torch

from . import block_sparse
from .constants import (
    BITMAP_WORD_BITS,
    CUDA_BLOCK_K,
    CUDA_BLOCK_Q,
    CUDA_HEAD_DIMS,
    CUDA_MAX_GROUP,
    CUDA_ROW_PAD,
)

ESTIMATE_BITS = {"int8": 8, "int4": 4}
COMPUTES = ("auto", "cuda", "flex")
STOP_AFTER = (None, "quant", "select")
# The faster computation pass per compute capability major, from `sale bench-op` (docs/BENCHMARKS.md); "cuda" where
# nothing was measured. H100 (9.x), 2026-11-25, 16K tokens, 64x32 blocks: own kernel (wgmma) 1.37 ms vs
# FlexAttention 3.26 ms at density 0.22, 5.47 vs 13.86 ms dense; H200, 2026-11-26, 32K: 2.66 vs 7.14 ms at
# density 0.13, 16.55 vs 43.44 ms dense.
_DEFAULT_COMPUTE = {9: "cuda"}
# The quantized copies of Q and K (and their per-row floats) that the selection reads: at most this many bytes
# alive at once, by running quantization and selection over chunks of kv heads (and batch entries) when the
# whole call would need more. The bitmap of the whole call (32 MiB at 128K tokens, 32 heads) comes on top.
SELECT_WORKSPACE_BYTES = 96 << 20

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
    if q.shape[-1] not in CUDA_HEAD_DIMS:
        return False, f"head_dim {q.shape[-1]} (the CUDA kernels take 64 or 128)"
    if q.shape[1] // k.shape[1] > CUDA_MAX_GROUP:
        return False, (f"{q.shape[1] // k.shape[1]} query heads per kv head (the CUDA kernels take at most "
                       f"{CUDA_MAX_GROUP})")
    if q.shape[2] > k.shape[2]:
        return False, f"Lq={q.shape[2]} > Lk={k.shape[2]} (queries are the last Lq of the Lk positions)"
    if (block_q, block_k) != (CUDA_BLOCK_Q, CUDA_BLOCK_K):
        return False, (f"block_q={block_q}, block_k={block_k} (the CUDA kernels take {CUDA_BLOCK_Q} and "
                       f"{CUDA_BLOCK_K})")
    if estimate not in ESTIMATE_BITS:
        return False, f"estimate={estimate!r} (the CUDA kernels implement 'int8' and 'int4'; use backend='reference')"
    if k.shape[2] >= 2**31 // 2 or q.shape[0] * q.shape[1] * k.shape[2] * q.shape[3] >= 2**62:
        return False, "input too large for the CUDA kernels (32-bit indices)"
    return True, "supported"


def check_compute(compute: str) -> None:
    """ValueError unless ``compute`` names a computation pass."""
    if compute not in COMPUTES:
        raise ValueError(f"compute must be one of {COMPUTES}, got {compute!r}")


def default_compute() -> str:
    """The computation pass ``compute="auto"`` uses on the current GPU: "cuda" or "flex"."""
    major, _ = torch.cuda.get_device_capability()
    return _DEFAULT_COMPUTE.get(major, "cuda")


def _pad(rows: int) -> int:
    """Rows of a quantized Q/K buffer: whole multiples of CUDA_ROW_PAD."""
    return math.ceil(rows / CUDA_ROW_PAD) * CUDA_ROW_PAD


def _words(blocks: int) -> int:
    """Bitmap words for this many key blocks."""
    return math.ceil(blocks / BITMAP_WORD_BITS)


def _selection_chunks(B: int, Hq: int, Hkv: int, L: int, d: int, estimate: str,
                      budget: int | None = None, Lk: int | None = None) -> list[tuple[int, int, int, int]]:
    """(b0, b1, h0, h1) batch and kv-head ranges whose quantized Q/K stay within ``budget`` bytes each (default
    SELECT_WORKSPACE_BYTES): the whole call when it fits, else one batch entry at a time with as many kv heads as
    fit (at least one). ``L`` is the query length Lq, ``Lk`` the key length (default L).

    Every head's quantization and selection depend only on its own kv head's group, so chunking changes nothing
    but the number of launches."""
    budget = SELECT_WORKSPACE_BYTES if budget is None else budget
    Lk = L if Lk is None else Lk
    G, LqPad, LkPad = Hq // Hkv, _pad(L), _pad(Lk)
    ib = d // 2 if estimate == "int4" else d
    # per kv head and batch entry: the int8 rows of its G query heads with their floats sq and qkm (Lq long), its
    # own int8 rows with sk, and per query head qm and its block maxima (Lk long)
    per_head = LqPad * G * (ib + 4 * 2) + LkPad * (ib + 4 * G + 4 * G // 32 + 4)
    if B * Hkv * per_head <= budget:
        return [(0, B, 0, Hkv)]
    hc = max(1, min(Hkv, budget // per_head))
    return [(b, b + 1, h, min(Hkv, h + hc)) for b in range(B) for h in range(0, Hkv, hc)]


def _visible_pairs(Lq: int, Lk: int, block_q: int, block_k: int) -> int:
    """Causally visible (query block, key block) pairs of one head: query block qb sees the key blocks up to the one
    holding its last row's last key, (last row) + Lk - Lq."""
    nQ, off = math.ceil(Lq / block_q), Lk - Lq
    return sum((min((qb + 1) * block_q, Lq) - 1 + off) // block_k + 1 for qb in range(nQ))


@torch.library.custom_op("sale::quantize", mutates_args=())
def _quantize_op(q: torch.Tensor, k: torch.Tensor, per_block: bool, bits: int,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor]:
    """Stage 1: (kint, sk, qint, sq, qm, qkm)."""
    return tuple(_load().quantize(q, k, int(per_block), bits, scale))


@_quantize_op.register_fake
def _(q, k, per_block, bits, scale):
    B, Hq, Lq, d = q.shape
    Hkv, Lk, ib = k.shape[1], k.shape[2], d // 2 if bits == 4 else d
    LqPad, LkPad = _pad(Lq), _pad(Lk)
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(B, Hkv, LkPad, ib, dtype=torch.int8), q.new_empty(B, Hkv, LkPad, **f32),
            q.new_empty(B, Hq, LqPad, ib, dtype=torch.int8), q.new_empty(B, Hq, LqPad, **f32),
            q.new_empty(B, Hq, LkPad, **f32), q.new_empty(B, Hq, LqPad, **f32))


@torch.library.custom_op("sale::select", mutates_args=())
def _select_op(q: torch.Tensor, k: torch.Tensor, qint: torch.Tensor, sq: torch.Tensor, kint: torch.Tensor,
               sk: torch.Tensor, qm: torch.Tensor, qkm: torch.Tensor, tau: torch.Tensor, scale: float,
               sink_tokens: int, local_window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2: (bitmap [B, Hq, nQ, nW] int32, computed pairs [B, Hq] int32)."""
    return tuple(_load().select(q, k, qint, sq, kint, sk, qm, qkm, tau, scale, sink_tokens, local_window))


@_select_op.register_fake
def _(q, k, qint, sq, kint, sk, qm, qkm, tau, scale, sink_tokens, local_window):
    B, Hq, Lq, _ = q.shape
    nW = _words(math.ceil(k.shape[2] / CUDA_BLOCK_K))
    return (q.new_empty(B, Hq, math.ceil(Lq / CUDA_BLOCK_Q), nW, dtype=torch.int32),
            q.new_empty(B, Hq, dtype=torch.int32))


@torch.library.custom_op("sale::compute", mutates_args=())
def _compute_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bits: torch.Tensor, scale: float,
                need_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 3: (out, lse [B, Hq, Lq] fp32, or [0, Hq, Lq] without need_lse)."""
    return tuple(_load().compute(q, k, v, bits, scale, need_lse))


@_compute_op.register_fake
def _(q, k, v, bits, scale, need_lse):
    B, Hq, Lq, _ = q.shape
    return torch.empty_like(q), q.new_empty(B if need_lse else 0, Hq, Lq, dtype=torch.float32)


def _on_q_device(fn):
    """Run ``fn`` with q's GPU as the current device, whichever GPU is current (layers spread over GPUs): the
    stage-timing events and the capability checks follow q."""

    @functools.wraps(fn)
    def wrapper(q, *args, **kwargs):
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            return fn(q, *args, **kwargs)

    return wrapper


def sale_attention_cuda(q, k, v, thresholds, *, scale, block_q, block_k, sink_tokens, local_window, estimate,
                        quant_group, need_block_map, need_lse, timing: bool = False, compute: str = "auto",
                        stop_after: str | None = None):
    """SALE attention with the CUDA kernels, on q's GPU: q [B, Hq, Lq, d], k and v [B, Hkv, Lk, d], 1 <= Lq <= Lk
    (Lq < Lk: the queries are the last Lq positions, a chunk of a chunked prefill).

    Returns (out, lse or None, block_map or None, density [B, Hq] fp32, timings dict or None); timings (ms per
    stage: "quant", "select", "compute", from CUDA events) only when ``timing`` is True. ``compute``: "cuda",
    "flex" or "auto" (``default_compute()``). ``stop_after`` "quant" or "select" ends the call after that stage
    (for timing the stages): out and lse are then None, and after "quant" so are the map and the density.
    Quantization and selection run over chunks of kv heads when the call's quantized Q/K would exceed
    ``SELECT_WORKSPACE_BYTES`` (at 128K tokens and Llama-3.1-8B shapes: 8 chunks of ~87 MiB instead of 680 MiB);
    the stage timings are then summed over the chunks.
    """
    from .api import check_arguments  # the public op owns argument validation (and imports this module)

    check_compute(compute)
    if stop_after not in STOP_AFTER:
        raise ValueError(f"stop_after must be one of {STOP_AFTER}, got {stop_after!r}")
    if sink_tokens is None:
        sink_tokens = block_k
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    tau = check_arguments(q, k, v, thresholds, scale, block_q, block_k, sink_tokens, local_window, estimate,
                          quant_group)
    ok, why = supports(q, k, block_q=block_q, block_k=block_k, estimate=estimate)
    if not ok:
        raise ValueError(f"the CUDA backend does not support this call: {why}")
    return run(q, k, v, tau, scale=scale, block_q=block_q, block_k=block_k, sink_tokens=sink_tokens,
               local_window=local_window, estimate=estimate, quant_group=quant_group, need_block_map=need_block_map,
               need_lse=need_lse, timing=timing, compute=compute, stop_after=stop_after)


@_on_q_device
def run(q, k, v, tau, *, scale: float, block_q, block_k, sink_tokens: int, local_window, estimate, quant_group,
        need_block_map, need_lse, timing: bool = False, compute: str = "auto", stop_after: str | None = None):
    """The three passes on arguments already checked (``api.check_arguments``) and supported (``supports``):
    ``tau`` fp32 on q's device, ``scale`` and ``sink_tokens`` resolved. Returns as ``sale_attention_cuda``."""
    tau = tau.contiguous()
    if compute == "auto":
        compute = default_compute()
    q = q.contiguous()
    k = k.contiguous()
    v = v.contiguous()
    B, Hq, Lq, d = q.shape
    Lk = k.shape[2]
    nK = math.ceil(Lk / block_k)
    scale = float(scale)

    chunks = _selection_chunks(B, Hq, k.shape[1], Lq, d, estimate, Lk=Lk)
    G = Hq // k.shape[1]
    marks = []  # (stage, start event, end event)

    def mark(stage, fn):
        if not timing:
            return fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        marks.append((stage, start, end))
        return result

    def finish(stages):
        """ms per stage, summed over the chunks"""
        if not timing:
            return None
        torch.cuda.synchronize(q.device)
        stage_ms = dict.fromkeys(stages, 0.0)
        for stage, start, end in marks:
            stage_ms[stage] += start.elapsed_time(end)
        return stage_ms

    if len(chunks) > 1:
        bits = q.new_empty(B, Hq, math.ceil(Lq / block_q), _words(nK), dtype=torch.int32)
        pairs = q.new_empty(B, Hq, dtype=torch.int32)
    for b0, b1, h0, h1 in chunks:
        qc, kc, tc = q[b0:b1, h0 * G:h1 * G], k[b0:b1, h0:h1], tau[h0 * G:h1 * G]  # contiguous views
        kint, sk, qint, sq, qm, qkm = mark("quant", lambda qc=qc, kc=kc: torch.ops.sale.quantize(
            qc, kc, quant_group == "per_block", ESTIMATE_BITS[estimate], scale))
        if stop_after == "quant":
            continue
        res = mark("select", lambda a=(qc, kc, qint, sq, kint, sk, qm, qkm, tc): torch.ops.sale.select(
            *a, scale, int(sink_tokens), int(local_window)))
        del kint, sk, qint, sq, qm, qkm
        if len(chunks) == 1:
            bits, pairs = res
        else:
            bits[b0:b1, h0 * G:h1 * G] = res[0]
            pairs[b0:b1, h0 * G:h1 * G] = res[1]
        del res
    if stop_after == "quant":
        return None, None, None, None, finish(("quant",))
    # in float64 (torch divides a CUDA tensor by a scalar as a multiplication by its reciprocal): a dense head
    # gets exactly 1.0
    density = (pairs.double() / _visible_pairs(Lq, Lk, block_q, block_k)).float()
    block_map = block_sparse.bits_to_block_map(bits, nK) if need_block_map or compute == "flex" else None
    if stop_after == "select":
        return None, None, (block_map if need_block_map else None), density, finish(("quant", "select"))

    def attend():
        if compute == "cuda":
            return torch.ops.sale.compute(q, k, v, bits, scale, bool(need_lse))
        res = block_sparse.flex_block_sparse_attention(q, k, v, block_map, block_q=block_q, block_k=block_k,
                                                       scale=scale, return_lse=need_lse)
        return res if need_lse else (res, None)

    out, lse = mark("compute", attend)
    return (out, (lse if need_lse else None), (block_map if need_block_map else None), density,
            finish(("quant", "select", "compute")))
