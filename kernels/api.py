"""The public SALE attention op: input checks, backend choice, result packaging."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import constants, cuda_backend
from .dense import bottom_right_mask, causal_sdpa
from .reference import sale_attention_reference

ESTIMATES = ("int4", "int8", "none")
QUANT_GROUPS = ("per_token", "per_block")
BACKENDS = ("auto", "reference", "cuda")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
__all__ = ["SaleOutput", "available_backends", "bottom_right_mask", "causal_sdpa", "check_arguments",
           "check_thresholds_values", "sale_attention"]


@dataclass
class SaleOutput:
    """Result of :func:`sale_attention` when extras are requested; unrequested extras are None."""

    out: torch.Tensor
    block_map: torch.Tensor | None = None  # bool [B, Hq, nQ, nK], True = computed
    lse: torch.Tensor | None = None  # fp32 [B, Hq, Lq], natural log
    density: torch.Tensor | None = None  # fp32 [B, Hq]
    timings: dict | None = None  # ms per stage ("quant", "select", "compute") where the backend reports them


def sale_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    thresholds: torch.Tensor,
    *,
    scale: float | None = None,
    block_q: int = constants.BLOCK_Q,
    block_k: int = constants.BLOCK_K,
    sink_tokens: int | None = constants.SINK_TOKENS,
    local_window: int = constants.LOCAL_WINDOW,
    estimate: str = constants.ESTIMATE,
    quant_group: str = constants.QUANT_GROUP,
    dense_below: int = constants.DENSE_BELOW,
    backend: str = constants.BACKEND,
    compute: str = "auto",
    return_block_map: bool = False,
    return_lse: bool = False,
    return_density: bool = False,
    return_timings: bool = False,
):
    """Causal SALE sparse attention (semantics: ``docs/SPEC.md``).

    q: [B, Hq, Lq, d]; k, v: [B, Hkv, Lk, d] with Hq % Hkv == 0 (GQA, K/V never repeated) and Lq <= Lk: the
    queries are the last Lq positions (causal mask aligned bottom-right; Lq < Lk is one chunk of a chunked
    prefill); fp16, bf16 or fp32. A call with Lk <= ``dense_below`` is exact dense attention. thresholds: [Hq] tau per query head (0 = dense head). Returns the output tensor, or a
    :class:`SaleOutput` when any ``return_*`` flag is set (density is filled whenever an object is returned).
    ``return_timings`` asks the CUDA backend for ms per stage (quant, select, compute); it synchronizes.
    ``compute`` picks the CUDA backend's computation pass: "cuda" (own kernel), "flex" (FlexAttention on the same
    block list) or "auto" (the faster on this GPU); the reference ignores it.
    """
    tau = check_arguments(q, k, v, thresholds, scale, block_q, block_k, sink_tokens, local_window, estimate,
                          quant_group, dense_below, backend)
    cuda_backend.check_compute(compute)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    sink_tokens = block_k if sink_tokens is None else sink_tokens
    want_object = return_block_map or return_lse or return_density or return_timings
    dense = k.shape[2] <= dense_below  # the short-input rule counts keys: a short last chunk stays sparse

    chosen = _choose_backend(backend, q, k, block_q=block_q, block_k=block_k, estimate=estimate)
    kwargs = dict(scale=scale, block_q=block_q, block_k=block_k, sink_tokens=sink_tokens, local_window=local_window,
                  estimate=estimate, quant_group=quant_group, need_block_map=return_block_map, need_lse=return_lse)
    timings = None
    if chosen == "cuda":
        # dense heads go to the fastest SDPA backend unless the caller wants what only our kernels report
        sdpa_ok = not (return_block_map or return_lse)
        tau_host = tau.cpu()  # one sync: which heads are dense decides the path
        if dense or not bool(tau_host.any()):
            if not want_object:
                return causal_sdpa(q, k, v, scale)
            if sdpa_ok:
                return _dense_heads_sdpa(q, k, v, scale, None, None, return_timings)
            tau = torch.zeros_like(tau)
        elif sdpa_ok:
            dense_groups = (tau_host.view(k.shape[1], -1) == 0).all(dim=1)
            if bool(dense_groups.any()):
                return _dense_heads_sdpa(q, k, v, scale, dense_groups, tau, return_timings,
                                         sparse=dict(kwargs, compute=compute))
        out, lse, block_map, density, timings = cuda_backend.run(q, k, v, tau, **kwargs, timing=return_timings,
                                                                 compute=compute)
    else:
        out, lse, block_map, density = sale_attention_reference(q, k, v, tau, dense=dense, **kwargs)
    if not want_object:
        return out
    return SaleOutput(out=out, block_map=block_map, lse=lse, density=density, timings=timings)


def _dense_heads_sdpa(q, k, v, scale, dense_groups, tau, timings: bool, sparse: dict | None = None) -> SaleOutput:
    """Dense heads through SDPA, the rest through the CUDA SALE kernels.

    ``dense_groups`` (bool [Hkv] on the CPU; None = every head) marks the kv groups whose every query head has
    tau 0: their heads are exact attention, so the fastest SDPA backend runs them (no estimate, no selection);
    the other groups' heads run the SALE kernels with ``sparse`` (their kwargs). Density: 1 for dense heads.
    Timings (when asked): the sparse heads' stages plus "dense", the SDPA part.
    """
    B, Hq = q.shape[:2]
    G = Hq // k.shape[1]
    density = torch.ones(B, Hq, device=q.device, dtype=torch.float32)
    stage: dict[str, float] = {}
    if dense_groups is None:
        start = _event(timings)
        out = causal_sdpa(q, k, v, scale)
        if timings:
            stage["dense"] = _elapsed(start)
        return SaleOutput(out=out, density=density, timings=stage if timings else None)
    kv_d, kv_s = dense_groups.nonzero().flatten(), (~dense_groups).nonzero().flatten()
    heads = torch.arange(G)
    h_d, h_s = (kv_d[:, None] * G + heads).flatten(), (kv_s[:, None] * G + heads).flatten()
    dev_d, dev_s, kv_d, kv_s = h_d.to(q.device), h_s.to(q.device), kv_d.to(q.device), kv_s.to(q.device)
    out = torch.empty_like(q)
    start = _event(timings)
    out[:, dev_d] = causal_sdpa(q[:, dev_d], k[:, kv_d], v[:, kv_d], scale)
    if timings:
        stage["dense"] = _elapsed(start)
    o_s, _, _, dens_s, t_s = cuda_backend.run(q[:, dev_s], k[:, kv_s], v[:, kv_s], tau[dev_s], **sparse,
                                              timing=timings)
    out[:, dev_s] = o_s
    density[:, dev_s] = dens_s
    if timings:
        stage.update(t_s or {})
    return SaleOutput(out=out, density=density, timings=stage if timings else None)


def _event(timings: bool):
    if not timings:
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _elapsed(start) -> float:
    end = torch.cuda.Event(enable_timing=True)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def available_backends() -> dict[str, str]:
    """Backend name -> "available" or the reason it is not."""
    ok, reason = cuda_backend.available()
    return {"reference": "available", "cuda": "available" if ok else reason}


def _choose_backend(backend: str, q: torch.Tensor, k: torch.Tensor, **options) -> str:
    """The backend for a call: "cuda" when asked or (auto) when it supports the call, else "reference"."""
    if backend == "reference":
        return "reference"
    ok, reason = cuda_backend.available()
    if backend == "cuda":
        if not q.is_cuda:
            raise ValueError("backend='cuda' needs CUDA tensors; q is on " + str(q.device))
        if not ok:
            raise ValueError(f"backend='cuda' is not available: {reason}")
        supported, why = cuda_backend.supports(q, k, **options)
        if not supported:
            raise ValueError(f"backend='cuda' does not support this call: {why}")
        return "cuda"
    if q.is_cuda and ok:
        if cuda_backend.supports(q, k, **options)[0]:
            return "cuda"
    return "reference"


def check_thresholds_values(thresholds: torch.Tensor) -> None:
    """Raise ValueError unless every tau is finite and >= 0; one device sync for a CUDA tensor (the messages are
    worked out only on failure)."""
    if bool((torch.isfinite(thresholds) & (thresholds >= 0)).all()):
        return
    tau = thresholds.detach().float().cpu()
    if torch.isnan(tau).any():
        raise ValueError("thresholds must not contain NaN")
    if (tau < 0).any():
        raise ValueError(f"thresholds must be >= 0 (0 = dense head), got min {tau.min().item():g}")
    raise ValueError("thresholds must be finite")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_arguments(q, k, v, thresholds, scale, block_q, block_k, sink_tokens, local_window, estimate, quant_group,
                    dense_below=constants.DENSE_BELOW, backend=constants.BACKEND) -> torch.Tensor:
    """Validate every argument of the op (also for direct callers of ``cuda_backend.sale_attention_cuda``); return
    thresholds as fp32 on q's device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            want = "[B, Hq, Lq, d]" if name == "q" else "[B, Hkv, Lk, d]"
            raise ValueError(f"{name} must be a 4-D tensor {want}, got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Hkv, Lk, d], got {tuple(k.shape)} and {tuple(v.shape)}")
    B, Hq, Lq, d = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k batch size must equal q's ({B}), got {k.shape[0]}")
    if k.shape[3] != d:
        raise ValueError(f"k head dim must equal q's ({d}), got {k.shape[3]}")
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    if Lq == 0 or d == 0 or B == 0:
        raise ValueError(f"q must be non-empty, got shape {tuple(q.shape)}")
    if Lq > Lk:
        raise ValueError(f"q length ({Lq}) must not exceed k length ({Lk}): the queries are the last Lq of the "
                         "Lk positions")

    if not isinstance(thresholds, torch.Tensor):
        raise ValueError(f"thresholds must be a torch.Tensor of shape [{Hq}], got {type(thresholds).__name__}")
    if thresholds.shape != (Hq,):
        raise ValueError(f"thresholds must have shape [{Hq}] (one tau per query head), got {tuple(thresholds.shape)}")
    if not thresholds.is_floating_point():
        raise ValueError(f"thresholds must be a floating-point tensor, got {thresholds.dtype}")
    check_thresholds_values(thresholds)
    tau = thresholds.detach().to(device=q.device, dtype=torch.float32)

    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        if not _is_int(val) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if sink_tokens is not None and (not _is_int(sink_tokens) or sink_tokens < 0):
        raise ValueError(f"sink_tokens must be an int >= 0 or None (one key block), got {sink_tokens!r}")
    if not _is_int(local_window) or local_window < 0:
        raise ValueError(f"local_window must be an int >= 0 (tokens), got {local_window!r}")
    if not _is_int(dense_below) or dense_below < 0:
        raise ValueError(f"dense_below must be an int >= 0 (tokens), got {dense_below!r}")
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
    if quant_group not in QUANT_GROUPS:
        raise ValueError(f"quant_group must be one of {QUANT_GROUPS}, got {quant_group!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return tau
