"""CUDA SALE kernels vs the reference (kernels/reference.py) and a float64 brute force.

Skipped without a CUDA device. The matrix: fresh structured inputs per case (a deterministic seed of its own),
L 1025 / 4096 / 8191 x heads 32/8 and 9/3 x d 64 / 128 x fp16 / bf16 x int8 / int4, plus two cases at 32768;
the heads of each case take the taus 0, 0.001, 0.004, 0.008, 1e9 cyclically. Each case checks:
- block maps equal the reference's except where an estimate lies within rounding of its threshold: a float64
  oracle recomputes the margin of every differing block from the reference's quantized values, the differing
  blocks are counted and bounded, and the totals are printed at the end of the run (conftest.py);
- output and lse vs float64 attention on the kernel's own block map, density vs that map, tau = 0 heads dense,
  tau = 1e9 heads exactly the sink+local set R, every output element written (poisoned allocator).
Also: compute="flex" on the same block list, per_block groups, GQA 16:1, 7:1, 2:1 and 1:1 (with 3:1, every
heads-per-CTA count of the selection), tau = 0 vs SDPA, runtime sink_tokens / local_window, determinism and
timings, errors for unsupported options, inputs on a second GPU (skipped with one), and real Q/K/V of the demo
model (written by scripts/capture_qkv.py; skipped when the file is absent).
"""

from __future__ import annotations

import math
import os
import zlib
from collections import defaultdict
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from sale_cli.data import synthetic_qkv  # noqa: E402
from sale_cli.kernels import cuda_backend, reference  # noqa: E402
from sale_cli.kernels.reference import sale_attention_reference  # noqa: E402

DEV = "cuda"
BQ, BK = 64, 32
TAUS = (0.0, 0.001, 0.004, 0.008, 1e9)
HUGE_TAU = 1e9
QKV_FILE = Path(os.environ.get("SALE_QKV_FILE", Path(__file__).resolve().parents[1] / "results/qkv/smollm2_qkv.pt"))
# A differing block is borderline if its decision flips within this relative rounding of the threshold (plus
# the effect of quantization ties, see _Oracle).
ROUNDING = 1e-3
# A quantized value is a tie if x / step is within TIE * qmax of a half-integer: fp32 differences in the means
# or the step (about 1e-6 relative) may round it either way.
TIE = 1e-5
MAP_STATS: list[tuple[str, int, int, float]] = []  # (case, differing blocks, visible blocks, max |margin|)


@pytest.fixture(scope="module", autouse=True)
def _block_map_totals(run_summary):
    """After this module: the totals of its block-map comparisons, for the end of the run (conftest.py)."""
    yield
    if not MAP_STATS:
        return
    run_summary.append(f"block maps vs reference, {len(MAP_STATS)} comparisons: differing blocks: "
                       f"{sum(s[1] for s in MAP_STATS)} of {sum(s[2] for s in MAP_STATS)}, "
                       f"max |margin| = {max(s[3] for s in MAP_STATS):.3g}")
    run_summary.extend(f"  {name}: {n} of {nvis}, max |margin| = {worst:.3g}" for name, n, nvis, worst in MAP_STATS
                       if n)


def _seed(*params) -> int:
    """A deterministic seed of its own for each case."""
    return zlib.crc32(repr(params).encode())


def _poison_allocator(nbytes: int) -> None:
    """Fill the caching allocator with NaN (fp32, fp16 and bf16 alike) so unwritten outputs show up.

    Frees the cache first, so that the next allocations are carved from the poisoned blocks: one large block
    of ``nbytes`` and a few small-pool segments (lse and bitmaps of small cases).
    """
    torch.cuda.empty_cache()
    nan = 0x7FC07FC0  # a NaN as one fp32 and as two fp16 / bf16 halves
    big = torch.full((nbytes // 4 + 1,), nan, dtype=torch.int32, device=DEV)
    small = [torch.full((1 << 18,), nan, dtype=torch.int32, device=DEV) for _ in range(16)]  # 1 MiB each
    del big, small


def _tau(Hq: int) -> torch.Tensor:
    """The matrix's taus, cyclically over the heads."""
    return torch.tensor([TAUS[h % len(TAUS)] for h in range(Hq)], dtype=torch.float32, device=DEV)


def _inputs(B, Hq, Hkv, L, d, dtype, seed, *, structured=True, k_offset=1.0):
    """q [B,Hq,L,d], k and v [B,Hkv,L,d] from data/synthetic_qkv.py plus a random per-channel K offset (removed
    by smoothing).

    ``structured``: LLM-like peaked attention in its ``spread`` variant: sink logit about 10 in every row, heavy
    logits 2.5-10 spread over the thresholds (10 + ln tau = 3.1, 4.5, 5.2 for tau 0.001, 0.004, 0.008), a local
    bias in half the rows, background logits about N(0, 0.6^2). The means of Q and K are large (sink, heavy and
    offset), so smoothing and the qm correction matter. Otherwise q, k, v ~ N(0, 1).
    """
    kind = "structured" if structured else "random"
    options = dict(spread=True, block_k=BK) if structured else {}
    return synthetic_qkv.make_inputs(kind, L, Hq, Hkv, d, dtype, seed, device=DEV, batch=B, k_offset=k_offset,
                                     **options)


def _run_cuda(q, k, v, tau, **kw):
    opts = dict(scale=None, block_q=BQ, block_k=BK, sink_tokens=None, local_window=128, estimate="int8",
                quant_group="per_token", need_block_map=True, need_lse=True, compute="cuda")
    opts.update(kw)
    _poison_allocator(q.numel() * q.element_size() * 4 + (1 << 26))
    return cuda_backend.sale_attention_cuda(q, k, v, tau, **opts)


def _run_ref(q, k, v, tau, *, scale, sink_tokens, local_window, estimate, quant_group):
    """The reference's block map."""
    return sale_attention_reference(
        q, k, v, tau, scale=scale, block_q=BQ, block_k=BK, sink_tokens=sink_tokens, local_window=local_window,
        estimate=estimate, quant_group=quant_group, dense=False, need_block_map=True, need_lse=False)[2]


def _brute_force(q, k, v, block_map, scale):
    """float64 causal attention over the keys of block_map [B,Hq,nQ,nK]: (out, lse), per kv head in row chunks.

    q [B,Hq,Lq,d], k/v [B,Hkv,Lk,d], Lq <= Lk: bottom-right causal (row i sees the keys j <= i + Lk - Lq)."""
    B, Hq, Lq, d = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G, off = Hq // Hkv, Lk - Lq
    out = torch.empty(B, Hq, Lq, d, dtype=torch.float64, device=q.device)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float64, device=q.device)
    chunk = max(BQ, (1 << 25) // (G * Lk) // BQ * BQ)  # rows per step: [G, rows, keys] <= 2^25 float64
    for b in range(B):
        for kh in range(Hkv):
            hs = slice(kh * G, (kh + 1) * G)
            qq, kk, vv = q[b, hs].double(), k[b, kh].double(), v[b, kh].double()
            for r0 in range(0, Lq, chunk):
                r1 = min(Lq, r0 + chunk)
                kend = r1 + off
                z = scale * qq[:, r0:r1] @ kk[:kend].T  # [G, rows, keys <= kend]
                rows = torch.arange(r0, r1, device=q.device)
                causal = torch.arange(kend, device=q.device)[None, :] <= rows[:, None] + off
                mask = reference._expand(block_map[b, hs, r0 // BQ:-(-r1 // BQ)], BQ, BK, r1 - r0, kend) & causal
                z.masked_fill_(~mask, -math.inf)
                lse[b, hs, r0:r1] = torch.logsumexp(z, dim=-1)
                out[b, hs, r0:r1] = torch.softmax(z, dim=-1) @ vv[:kend]
    return out, lse


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _check_outputs(name, q, k, v, out, lse, block_map, scale):
    """Output and lse vs float64 attention on block_map; every element written (finite after poisoning)."""
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), f"{name}: unwritten or non-finite output"
    assert lse is not None and lse.shape == q.shape[:3] and torch.isfinite(lse).all(), f"{name}: unwritten lse"
    ref_o, ref_lse = _brute_force(q, k, v, block_map, scale)
    tol = 1e-2 if q.dtype == torch.bfloat16 else 5e-3
    err = _rel(out, ref_o)
    assert err < tol, f"{name}: output rel err {err:.3g}"
    # per row, against the typical norm of a value row: catches a wrong or unwritten row that the Frobenius
    # norm of the whole tensor would average away
    v_norm = v.double().pow(2).mean().sqrt().item() * math.sqrt(q.shape[-1])
    row = ((out.double() - ref_o).norm(dim=-1).max() / v_norm).item()
    assert row < 4 * tol, f"{name}: worst row err {row:.3g}"
    lse_err = ((lse.double() - ref_lse).abs() - 1e-4 * ref_lse.abs()).max().item()
    assert lse_err < 1e-3, f"{name}: lse err {lse_err:.3g}"


def _ties(x, step, qmax):
    """Quantized values of x [..., L, d] (step [..., L]) that fp32 differences may round either way."""
    r = (x / torch.where(step > 0, step, torch.ones_like(step)).unsqueeze(-1)).abs()
    return ((r - r.floor() - 0.5).abs() <= TIE * qmax) & (step > 0).unsqueeze(-1)


def _block_max(x, nK):
    """[rows, keys] -> [nK]: the max over each key block's rows and keys (-inf past the keys)."""
    x = torch.nn.functional.pad(x, (0, nK * BK - x.shape[1]), value=-math.inf)
    return x.unflatten(1, (nK, BK)).amax(dim=(0, 2))


class _Oracle:
    """float64 margins of SALE's block selection (spec sections 4-6) from the reference's quantized values.

    For query block qb of head h and each key block: margin = max over the valid rows i and the visible keys j
    outside R of zhat_ij - thr_i, where thr_i = m_i + ln(l_i) + ln(tau) from the exact float64 logits of the
    smoothed K over R, and zhat_ij = scale * (step_q(i) step_k(j) Qint_i . Kint_j + qm_j) with
    qm_j = q_mean . k_smooth_j in float64; the block is selected iff margin > 0. An fp32 implementation may
    decide either way where every (i, j) the decision hinges on lies within bound_ij of the threshold:
    ROUNDING * max(1, |thr_i|), plus, for quantization ties in row i or key j, the most that rounding them the
    other way moves zhat_ij. So a block may legitimately differ iff lower <= 0 <= upper, the block maxima of
    (zhat - thr) -/+ bound.
    """

    def __init__(self, q, k, *, scale, estimate, quant_group, sink_tokens, local_window):
        B, Hq, Lq, _ = q.shape
        Lk = k.shape[2]
        self.G, self.Lq, self.off, self.scale = Hq // k.shape[1], Lq, Lk - Lq, scale
        self.r_blocks = reference._block_ranges(Lq, Lk, BQ, BK, sink_tokens, local_window)[1].to(q.device)
        qmax = reference.QMAX[estimate]
        per_block = quant_group == "per_block"
        self.batches = []
        for b in range(B):
            qf, kf = q[b].float(), k[b].float()  # the reference's quantization, op for op
            qs, ks = qf - qf.mean(dim=1, keepdim=True), kf - kf.mean(dim=1, keepdim=True)
            q_int, q_step = reference.quantize(qs, qmax, BQ if per_block else 1)
            k_int, k_step = reference.quantize(ks, qmax, BK if per_block else 1)
            q64, k64 = q[b].double(), k[b].double()
            ks64 = k64 - k64.mean(dim=1, keepdim=True)
            qm = (q64.mean(dim=1, keepdim=True).unflatten(0, (-1, self.G)) @ ks64[:, None].transpose(-1, -2))
            self.batches.append(dict(
                q=q64, ks=ks64, qm=qm.flatten(0, 1).squeeze(1), q_int=q_int, q_step=q_step, k_int=k_int,
                k_step=k_step, q_tie=_ties(qs, q_step, qmax), k_tie=_ties(ks, k_step, qmax)))

    def margins(self, b, h, qb, tau):
        """(margin, lower, upper) per key block [nK] of query block qb, head h (-inf: no candidate key)."""
        x = self.batches[b]
        kv = h // self.G
        r0, r1 = qb * BQ, min(self.Lq, (qb + 1) * BQ)
        kend = r1 + self.off  # keys visible to some row of the block
        dev = x["ks"].device
        causal = torch.arange(kend, device=dev)[None, :] <= torch.arange(r0, r1, device=dev)[:, None] + self.off
        in_r = reference._expand(self.r_blocks[qb:qb + 1], BQ, BK, r1 - r0, kend) & causal
        z = self.scale * x["q"][h, r0:r1] @ x["ks"][kv, :kend].T
        thr = torch.logsumexp(z.masked_fill(~in_r, -math.inf), dim=-1, keepdim=True) + math.log(tau)
        qi, ki = x["q_int"][h, r0:r1].double(), x["k_int"][kv, :kend].double()
        steps = x["q_step"][h, r0:r1, None].double() * x["k_step"][kv, None, :kend].double()
        zhat = self.scale * (steps * (qi @ ki.T) + x["qm"][h, None, :kend])
        flip = (x["q_tie"][h, r0:r1].double() @ (ki.abs() + 1).T
                + (qi.abs() + 1) @ x["k_tie"][kv, :kend].double().T)
        bound = ROUNDING * thr.abs().clamp(min=1) + self.scale * steps * flip
        e = (zhat - thr).masked_fill(in_r | ~causal, -math.inf)
        nK = self.r_blocks.shape[1]
        return _block_max(e, nK), _block_max(e - bound, nK), _block_max(e + bound, nK)


def _check_maps(name, bmap, rmap, q, k, tau, **opts):
    """Kernel vs reference block maps: every differing block borderline by the oracle, and few of them."""
    B, Hq, Lq, _ = q.shape
    vis = reference._block_ranges(Lq, k.shape[2], BQ, BK, opts["sink_tokens"], opts["local_window"])[0]
    nvis = int(vis.sum()) * B * Hq
    diff = (bmap != rmap).nonzero().tolist()
    worst, bad = 0.0, []
    if diff:
        oracle = _Oracle(q, k, **opts)
        by_qblock = defaultdict(list)
        for b, h, qb, kb in diff:
            by_qblock[b, h, qb].append(kb)
        for (b, h, qb), kbs in by_qblock.items():
            if float(tau[h]) == 0:
                bad.append(f"dense head {h}, query block {qb}: key blocks {kbs}")
                continue
            margin, lower, upper = (t.tolist() for t in oracle.margins(b, h, qb, float(tau[h])))
            for kb in kbs:
                worst = max(worst, abs(margin[kb]))
                if not lower[kb] <= 0 <= upper[kb]:
                    bad.append(f"(b={b}, h={h}, qb={qb}, kb={kb}) kernel {bool(bmap[b, h, qb, kb])}: margin "
                               f"{margin[kb]:.3g}, either way only within [{lower[kb]:.3g}, {upper[kb]:.3g}]")
    MAP_STATS.append((name, len(diff), nvis, worst))
    print(f"{name}: differing blocks: {len(diff)} of {nvis}, max |margin| = {worst:.3g}")
    assert not bad, f"{name}: {len(bad)} blocks differ from the reference beyond rounding: " + "; ".join(bad[:5])
    assert len(diff) <= max(4, 1e-3 * nvis), f"{name}: {len(diff)} of {nvis} blocks differ from the reference"


def _check_case(name, q, k, v, tau, *, scale=None, estimate="int8", quant_group="per_token", sink_tokens=BK,
                local_window=128, compute="cuda"):
    """One kernel call checked against float64 attention on its own map and against the reference's map
    (q [B,Hq,Lq,d] may be the last Lq rows of k's Lk positions).

    Returns (block map, density).
    """
    B, Hq, Lq, d = q.shape
    Lk = k.shape[2]
    opts = dict(scale=1.0 / math.sqrt(d) if scale is None else scale, estimate=estimate, quant_group=quant_group,
                sink_tokens=sink_tokens, local_window=local_window)
    out, lse, bmap, density, _ = _run_cuda(q, k, v, tau, compute=compute, **opts)
    assert bmap.shape == (B, Hq, math.ceil(Lq / BQ), math.ceil(Lk / BK)) and bmap.dtype == torch.bool
    _check_outputs(name, q, k, v, out, lse, bmap, opts["scale"])
    vis, r = (t.to(q.device) for t in reference._block_ranges(Lq, Lk, BQ, BK, sink_tokens, local_window))
    assert not (bmap & ~vis).any(), f"{name}: a block outside the causal range"
    assert not (r & ~bmap).any(), f"{name}: a block of R not computed"
    want = (bmap & vis).sum(dim=(-1, -2)).float() / vis.sum()
    assert density.shape == (B, Hq) and torch.allclose(density, want, rtol=0, atol=1e-6), f"{name}: density"
    assert bmap[:, tau == 0].eq(vis).all(), f"{name}: a tau = 0 head is not dense"
    assert bmap[:, tau >= HUGE_TAU].eq(r).all(), f"{name}: a tau = 1e9 head computes more than R"
    _check_maps(name, bmap, _run_ref(q, k, v, tau, **opts), q, k, tau, **opts)
    return bmap, density


def _name(*params) -> str:
    return "-".join(str(p).replace("torch.", "") for p in params)


def _id(value):
    """pytest ids: dtypes by name."""
    return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else None


def _matrix():
    cases = [(L, Hq, Hkv, d, dtype, est) for L in (1025, 4096, 8191) for Hq, Hkv in ((32, 8), (9, 3))
             for d in (64, 128) for dtype in (torch.float16, torch.bfloat16) for est in ("int8", "int4")]
    # L = 32768 costs 16x L = 8191 in the reference's selection and the float64 brute force (both grow as L^2),
    # while what L changes in the kernels (key-block loops, bitmap words, grid size) does not interact with the
    # other parameters: two cases cover both GQA layouts, head dims, dtypes and estimates once at that length.
    cases += [(32768, 32, 8, 128, torch.bfloat16, "int8"), (32768, 9, 3, 64, torch.float16, "int4")]
    params = []
    for L, Hq, Hkv, d, dtype, est in cases:
        B = 2 if L <= 4096 and (d == 64) == (dtype == torch.float16) else 1
        params.append(pytest.param(B, Hq, Hkv, L, d, dtype, est, id=_name(f"L{L}", f"h{Hq}x{Hkv}", f"d{d}", dtype,
                                                                         est, f"B{B}")))
    return params


@pytest.mark.parametrize("B,Hq,Hkv,L,d,dtype,estimate", _matrix())
def test_matrix(B, Hq, Hkv, L, d, dtype, estimate):
    q, k, v = _inputs(B, Hq, Hkv, L, d, dtype, _seed(B, Hq, Hkv, L, d, dtype, estimate))
    tau = _tau(Hq)
    bmap, density = _check_case(_name(f"L{L}", f"h{Hq}x{Hkv}", f"d{d}", dtype, estimate, f"B{B}"), q, k, v, tau,
                                estimate=estimate)
    # the selection is not trivial: tau = 0.001 heads compute blocks outside R, tau = 0.008 heads skip some
    r = reference._block_ranges(L, L, BQ, BK, BK, 128)[1].to(DEV)
    assert (bmap[:, tau == TAUS[1]] & ~r).flatten(2).any(-1).all(), "a tau = 0.001 head computes R only"
    assert (density[:, tau == TAUS[3]] < 1).all(), density


@pytest.mark.parametrize("B,Hq,Hkv,L,d,dtype,estimate,group", [
    (2, 9, 3, 1337, 64, torch.float16, "int8", "per_block"),
    (1, 8, 8, 2048, 128, torch.bfloat16, "int4", "per_block"),
    (1, 16, 1, 3001, 64, torch.bfloat16, "int8", "per_token"),
    (2, 4, 4, 2500, 128, torch.float16, "int4", "per_token"),
    (1, 14, 2, 2049, 128, torch.bfloat16, "int8", "per_token"),  # G = 7: one head per selection CTA
    (1, 12, 6, 1500, 64, torch.float16, "int8", "per_block"),  # G = 2: two heads per selection CTA
], ids=_id)
def test_quant_groups_and_gqa_extremes(B, Hq, Hkv, L, d, dtype, estimate, group):
    q, k, v = _inputs(B, Hq, Hkv, L, d, dtype, _seed("groups", B, Hq, Hkv, L, d, dtype, estimate, group))
    _check_case(_name(f"L{L}", f"h{Hq}x{Hkv}", f"d{d}", dtype, estimate, group, f"B{B}"), q, k, v, _tau(Hq),
                estimate=estimate, quant_group=group)


@pytest.mark.parametrize("B,Hq,Hkv,L,d,dtype,estimate", [
    (1, 32, 8, 4096, 128, torch.bfloat16, "int8"),
    (2, 9, 3, 1025, 64, torch.float16, "int4"),
], ids=_id)
def test_flex_compute_on_the_same_block_list(B, Hq, Hkv, L, d, dtype, estimate):
    q, k, v = _inputs(B, Hq, Hkv, L, d, dtype, _seed("flex", B, Hq, Hkv, L, d, dtype, estimate))
    tau = _tau(Hq)
    _, _, cuda_map, cuda_density, _ = _run_cuda(q, k, v, tau, estimate=estimate, compute="cuda")
    flex_map, flex_density = _check_case(_name("flex", f"L{L}", f"h{Hq}x{Hkv}", f"d{d}", dtype, estimate), q, k, v,
                                         tau, estimate=estimate, compute="flex")
    assert torch.equal(flex_map, cuda_map) and torch.equal(flex_density, cuda_density)


@pytest.mark.parametrize("L,d,dtype,estimate", [(1000, 64, torch.bfloat16, "int8"), (2500, 128, torch.float16, "int4")],
                         ids=_id)
def test_tau_zero_is_dense(L, d, dtype, estimate):
    q, k, v = _inputs(1, 6, 2, L, d, dtype, _seed("dense", L, d, dtype, estimate), structured=False)
    out, _, bmap, density, _ = _run_cuda(q, k, v, torch.zeros(6, device=DEV), estimate=estimate)
    assert bmap.eq(reference._block_ranges(L, L, BQ, BK, BK, 128)[0].to(DEV)).all()
    assert torch.equal(density, torch.ones_like(density))
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(3, 1), v.double().repeat_interleave(3, 1), is_causal=True)
    assert _rel(out, dense) < (1e-2 if dtype == torch.bfloat16 else 5e-3)


@pytest.mark.parametrize("sink,window", [(0, 0), (100, 300), (1, 64)])
def test_runtime_sink_and_window(sink, window):
    q, k, v = _inputs(1, 5, 1, 3000, 128, torch.bfloat16, _seed("runtime", sink, window))
    _check_case(_name("sink", sink, "window", window), q, k, v, _tau(5), sink_tokens=sink, local_window=window)


@pytest.mark.parametrize("estimate", ["int8", "int4"])
def test_timings_and_repeatability(estimate):
    q, k, v = _inputs(1, 8, 2, 4096, 128, torch.bfloat16, _seed("repeat", estimate))
    tau = torch.full((8,), 0.004, device=DEV)
    o1, l1, m1, d1, t = _run_cuda(q, k, v, tau, estimate=estimate, need_lse=False, timing=True)
    assert l1 is None and set(t) == {"quant", "select", "compute"} and all(x >= 0 for x in t.values())
    o2, _, m2, d2, _ = _run_cuda(q, k, v, tau, estimate=estimate)
    assert torch.equal(m1, m2) and torch.equal(d1, d2) and torch.equal(o1, o2), "non-deterministic result"


@pytest.mark.parametrize("B,Hq,Hkv,estimate", [(1, 8, 2, "int8"), (2, 9, 3, "int4")])
def test_selection_in_chunks_gives_the_same_result(monkeypatch, B, Hq, Hkv, estimate):
    """A workspace budget below one kv head's quantized copies: one chunk per (batch entry, kv head), same bits."""
    q, k, v = _inputs(B, Hq, Hkv, 3000, 128, torch.bfloat16, _seed("chunks", B, Hq, estimate))
    tau = _tau(Hq)
    whole = _run_cuda(q, k, v, tau, estimate=estimate, timing=True)
    monkeypatch.setattr(cuda_backend, "SELECT_WORKSPACE_BYTES", 1)
    assert len(cuda_backend._selection_chunks(B, Hq, Hkv, 3000, 128, estimate, 1)) == B * Hkv
    chunked = _run_cuda(q, k, v, tau, estimate=estimate, timing=True)
    for a, b in zip(whole[:4], chunked[:4], strict=True):
        assert torch.equal(a, b)
    assert set(chunked[4]) == {"quant", "select", "compute"} and chunked[4]["select"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("estimate", ["int8", "int4"])
def test_second_gpu_gives_the_same_result(estimate):
    """Inputs on cuda:1 while cuda:0 is current (a model spread over GPUs): the same map, density, output and lse
    as on cuda:0, bit for bit, and stage timings from events on cuda:1."""
    q, k, v = _inputs(1, 8, 2, 4096, 128, torch.bfloat16, _seed("second-gpu", estimate))
    tau = torch.tensor([0.0, 0.004, 0.008, 0.2] * 2, device=DEV)
    opts = dict(scale=None, block_q=BQ, block_k=BK, sink_tokens=None, local_window=128, estimate=estimate,
                quant_group="per_token", need_block_map=True, need_lse=True, compute="cuda")
    with torch.cuda.device(0):
        ref = cuda_backend.sale_attention_cuda(q, k, v, tau, **opts)
        got = cuda_backend.sale_attention_cuda(*(x.to("cuda:1") for x in (q, k, v, tau)), timing=True, **opts)
        assert torch.cuda.current_device() == 0
    for name, a, b in zip(("out", "lse", "block map", "density"), got[:4], ref[:4], strict=True):
        assert a.device == torch.device("cuda:1"), name
        assert torch.equal(a.cpu(), b.cpu()), f"{name} differs between cuda:1 and cuda:0"
    assert all(ms > 0 for ms in got[4].values()), got[4]
    with pytest.raises(ValueError, match="one device"):
        cuda_backend.sale_attention_cuda(q, k.to("cuda:1"), v, tau, **opts)


def test_unsupported_configurations_raise():
    q, k, v = _inputs(1, 4, 2, 256, 128, torch.bfloat16, 0, structured=False)
    tau = torch.full((4,), 0.01, device=DEV)
    for kw, match in (({"block_k": 64}, "block_k"), ({"block_q": 128}, "block_q"), ({"estimate": "none"}, "estimate")):
        with pytest.raises(ValueError, match=match):
            _run_cuda(q, k, v, tau, **kw)
    q96, k96, v96 = _inputs(1, 4, 2, 256, 96, torch.bfloat16, 0, structured=False)
    with pytest.raises(ValueError, match="head_dim"):
        _run_cuda(q96, k96, v96, tau)
    with pytest.raises(ValueError, match="must not exceed k length"):  # more queries than keys (Lq < Lk: a chunk)
        _run_cuda(q, k[:, :, :128], v[:, :, :128], tau)
    with pytest.raises(ValueError):
        _run_cuda(q.float(), k.float(), v.float(), tau)
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError):
            _run_cuda(q, k, v, torch.full((4,), bad, device=DEV))


@pytest.fixture(scope="module")
def captured():
    if not QKV_FILE.is_file():
        pytest.skip(f"no captured Q/K/V at {QKV_FILE}: run `python scripts/capture_qkv.py` or set SALE_QKV_FILE")
    return torch.load(QKV_FILE, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_id)
@pytest.mark.parametrize("estimate", ["int8", "int4"])
def test_real_qkv(captured, estimate, dtype):
    """Every captured layer of the demo model: one dense head, the others at 0.001, 0.004, 0.008 cyclically."""
    scale = captured["meta"]["scale"]
    for layer, *qkv in zip(captured["layers"], captured["q"], captured["k"], captured["v"], strict=True):
        q, k, v = (t.to(DEV, dtype) for t in qkv)
        tau = torch.tensor([0.0] + [TAUS[1 + h % 3] for h in range(q.shape[1] - 1)], device=DEV)
        _check_case(_name("real", f"layer{layer}", dtype, estimate), q, k, v, tau, scale=scale, estimate=estimate)
