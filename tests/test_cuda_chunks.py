"""CUDA SALE kernels on chunks of a chunked prefill: Lq < Lk (docs/SPEC.md).

The queries are the last Lq of Lk positions (bottom-right causal, offset off = Lk - Lq); query blocks count from
the call's first row, key blocks (R, visibility, the block map) absolutely; K's smoothing mean runs over the Lk
keys, Q's over the call's Lq rows. Skipped without a CUDA device. Each chunk case takes the last Lq rows of one
structured sequence of Lk positions (tests/test_cuda_kernel.py's inputs) and checks, as that file's matrix does:
output and lse vs float64 attention on the kernel's own map, the map vs the reference's (differences only within
rounding of the threshold, by the float64 oracle), density, dense and R-only heads. Shapes: Lq 1, 64, 1000, 1337,
2000, 4096 over Lk up to 32768, offsets that are multiples of 64, of 32 only, and ragged; GQA 4:1, 3:1, 2:1, 7:1,
16:1; d 64/128; fp16/bf16; int8/int4; per_token and per_block steps; runtime sink / window.

Then chunk boundaries at multiples of 64 against one whole call: with tau = 0 the concatenated chunk outputs and
lse equal the whole call's (fp tolerance; float64 dense attention as the oracle) and the maps are the visible
blocks row for row; with the matrix's taus the maps agree row for row except through the smoothing means (tau = 0
and tau = 1e9 heads exactly; the others within a small fraction of the visible pairs). Also compute="flex" with an
offset, and Lq > Lk rejected.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import test_cuda_kernel as K  # noqa: E402  (the shared inputs, runner, oracle and checks; tests/ is on sys.path)

from sale_cli.kernels import reference  # noqa: E402

BQ, BK, DEV = K.BQ, K.BK, K.DEV


def _chunk_inputs(B, Hq, Hkv, Lq, Lk, d, dtype, seed):
    """The last Lq query rows of one structured sequence of Lk positions, and its K, V."""
    q, k, v = K._inputs(B, Hq, Hkv, Lk, d, dtype, seed)
    return q[:, :, Lk - Lq:].contiguous(), k, v


# (B, Hq, Hkv, Lq, Lk, d, dtype, estimate, quant_group)
CHUNK_CASES = [
    (1, 32, 8, 64, 4160, 128, torch.bfloat16, "int8", "per_token"),  # off 4096: a multiple of 64
    (2, 9, 3, 64, 3001, 64, torch.float16, "int4", "per_token"),  # off 2937: ragged both sides
    (1, 32, 8, 1000, 8191, 64, torch.bfloat16, "int4", "per_token"),  # off 7191
    (2, 9, 3, 1000, 5000, 128, torch.float16, "int8", "per_token"),  # off 4000: a multiple of 32, not of 64
    (1, 32, 8, 4096, 32768, 128, torch.bfloat16, "int8", "per_token"),  # off 28672
    (1, 9, 3, 4096, 20001, 64, torch.float16, "int4", "per_token"),  # off 15905
    (1, 12, 6, 1337, 6001, 64, torch.bfloat16, "int8", "per_block"),  # G 2, per_block steps, ragged
    (1, 14, 2, 1000, 3333, 128, torch.float16, "int4", "per_block"),  # G 7: one head per selection CTA
    (1, 16, 1, 2000, 9000, 128, torch.bfloat16, "int8", "per_token"),  # G 16
    (1, 8, 2, 1, 2049, 128, torch.bfloat16, "int8", "per_token"),  # Lq 1 (one decode-like row)
    (2, 6, 2, 1, 777, 64, torch.float16, "int4", "per_token"),  # Lq 1, short prefix
]


def _case_id(case):
    B, Hq, Hkv, Lq, Lk, d, dtype, est, group = case
    return K._name(f"Lq{Lq}", f"Lk{Lk}", f"h{Hq}x{Hkv}", f"d{d}", dtype, est, group, f"B{B}")


@pytest.mark.parametrize("case", [pytest.param(c, id=_case_id(c)) for c in CHUNK_CASES])
def test_chunk_matrix(case):
    B, Hq, Hkv, Lq, Lk, d, dtype, estimate, group = case
    q, k, v = _chunk_inputs(B, Hq, Hkv, Lq, Lk, d, dtype, K._seed("chunk", *case))
    tau = K._tau(Hq)
    bmap, density = K._check_case(_case_id(case), q, k, v, tau, estimate=estimate, quant_group=group)
    if Lq >= 1000:  # enough rows that the selection is not trivial (as in test_cuda_kernel's matrix)
        r = reference._block_ranges(Lq, Lk, BQ, BK, BK, 128)[1].to(DEV)
        assert (bmap[:, tau == K.TAUS[1]] & ~r).flatten(2).any(-1).all(), "a tau = 0.001 head computes R only"
        assert (density[:, tau == K.TAUS[3]] < 1).all(), density


@pytest.mark.parametrize("sink,window", [(0, 0), (100, 300), (1, 64)])
def test_chunk_runtime_sink_and_window(sink, window):
    """R's sink and local range in absolute key positions: a window reaching back across the chunk's start."""
    q, k, v = _chunk_inputs(1, 5, 1, 700, 3000, 128, torch.bfloat16, K._seed("chunk-runtime", sink, window))
    K._check_case(K._name("chunk", "sink", sink, "window", window), q, k, v, K._tau(5), sink_tokens=sink,
                  local_window=window)


def _chunk_calls(q, k, v, tau, bounds, **kw):
    """One call per chunk [c0, c1) of the rows: q's rows c0..c1-1 over the prefix k, v [:c1]."""
    res = []
    for c0, c1 in zip(bounds[:-1], bounds[1:], strict=True):
        res.append(K._run_cuda(q[:, :, c0:c1].contiguous(), k[:, :, :c1].contiguous(), v[:, :, :c1].contiguous(),
                               tau, **kw))
    return res


CONCAT_CASES = [
    (5000, (0, 1024, 3072, 5000), 8, 2, 128, torch.bfloat16, "int8"),
    (4099, (0, 64, 2048, 4096, 4099), 9, 3, 64, torch.float16, "int4"),
]


@pytest.mark.parametrize("L,bounds,Hq,Hkv,d,dtype,estimate", CONCAT_CASES, ids=K._id)
def test_chunked_dense_equals_whole_dense(L, bounds, Hq, Hkv, d, dtype, estimate):
    """tau = 0: the chunk calls' outputs and lse, concatenated, equal one whole call's (and float64 dense
    attention); each chunk's map is the whole call's rows of its query blocks, nothing past the chunk's keys."""
    q, k, v = K._inputs(1, Hq, Hkv, L, d, dtype, K._seed("concat-dense", L, bounds, estimate))
    tau = torch.zeros(Hq, device=DEV)
    out, lse, bmap, density, _ = K._run_cuda(q, k, v, tau, estimate=estimate)
    vis = reference._block_ranges(L, L, BQ, BK, BK, 128)[0].to(DEV)
    assert bmap.eq(vis).all() and torch.equal(density, torch.ones_like(density))
    parts = _chunk_calls(q, k, v, tau, bounds, estimate=estimate)
    for (c0, c1), (_, _, pmap, pdens, _) in zip(zip(bounds[:-1], bounds[1:], strict=True), parts, strict=True):
        nk = math.ceil(c1 / BK)
        rows = bmap[:, :, c0 // BQ:math.ceil(c1 / BQ)]
        assert torch.equal(pmap, rows[..., :nk]), f"chunk [{c0}, {c1}): map differs from the whole call's rows"
        assert not rows[..., nk:].any()
        assert torch.equal(pdens, torch.ones_like(pdens))
    cat_out = torch.cat([p[0] for p in parts], dim=2)
    cat_lse = torch.cat([p[1] for p in parts], dim=2)
    tol = 1e-2 if dtype == torch.bfloat16 else 5e-3
    assert K._rel(cat_out, out) < tol / 4, K._rel(cat_out, out)
    assert (cat_lse - lse).abs().max().item() < 1e-4
    # both against float64 dense attention (the oracle), every row written
    K._check_outputs("concat-dense", q, k, v, cat_out, cat_lse, vis.expand_as(bmap), 1 / math.sqrt(d))
    print(f"chunked dense vs whole: bit-identical outputs: {torch.equal(cat_out, out)}, lse: "
          f"{torch.equal(cat_lse, lse)}")


@pytest.mark.parametrize("L,bounds,Hq,Hkv,d,dtype,estimate", CONCAT_CASES, ids=K._id)
def test_chunked_maps_follow_the_whole_call(L, bounds, Hq, Hkv, d, dtype, estimate):
    """The matrix's taus: each chunk is a valid call (checked in full), and its map equals the whole call's rows
    except through the smoothing means (which only change the estimate): tau = 0 and tau = 1e9 heads (visible
    blocks, R) exactly, the others in all but a small fraction of the visible pairs."""
    q, k, v = K._inputs(1, Hq, Hkv, L, d, dtype, K._seed("concat-maps", L, bounds, estimate))
    tau = K._tau(Hq)
    whole, _ = K._check_case(K._name("whole", f"L{L}", estimate), q, k, v, tau, estimate=estimate)
    ndiff = nvis = 0
    for c0, c1 in zip(bounds[:-1], bounds[1:], strict=True):
        qc, kc, vc = (x.contiguous() for x in (q[:, :, c0:c1], k[:, :, :c1], v[:, :, :c1]))
        pmap, _ = K._check_case(K._name("chunk", c0, c1, estimate), qc, kc, vc, tau, estimate=estimate)
        rows = whole[:, :, c0 // BQ:math.ceil(c1 / BQ)]
        nk = math.ceil(c1 / BK)
        assert not rows[..., nk:].any()
        rows = rows[..., :nk]
        fixed = (tau == 0) | (tau >= K.HUGE_TAU)
        assert torch.equal(pmap[:, fixed], rows[:, fixed]), f"chunk [{c0}, {c1}): dense or R-only rows differ"
        ndiff += int((pmap != rows).sum())
        nvis += int(reference._block_ranges(c1 - c0, c1, BQ, BK, BK, 128)[0].sum()) * Hq
    # measured with the reference on CPU (similar inputs, L 3000): 0.06 % (int8), 0.6 % (int4)
    bound = 0.02 if estimate == "int8" else 0.05
    print(f"chunk maps vs whole call ({estimate}): {ndiff} of {nvis} visible pairs differ")
    assert ndiff <= bound * nvis, f"{ndiff} of {nvis} visible pairs differ between chunked and whole maps"


def test_flex_compute_with_an_offset():
    """compute="flex" on a chunk: FlexAttention with the bottom-right causal mask over the same block list."""
    q, k, v = _chunk_inputs(1, 8, 2, 1000, 5003, 128, torch.bfloat16, K._seed("chunk-flex"))
    tau = K._tau(8)
    _, _, cuda_map, cuda_density, _ = K._run_cuda(q, k, v, tau, compute="cuda")
    flex_map, flex_density = K._check_case("chunk-flex", q, k, v, tau, compute="flex")
    assert torch.equal(flex_map, cuda_map) and torch.equal(flex_density, cuda_density)


def test_more_queries_than_keys_is_an_error():
    q, k, v = K._inputs(1, 4, 2, 256, 64, torch.bfloat16, 0, structured=False)
    tau = torch.full((4,), 0.01, device=DEV)
    with pytest.raises(ValueError, match="must not exceed k length"):
        K._run_cuda(q, k[:, :, :200], v[:, :, :200], tau)
    with pytest.raises(ValueError, match="must not exceed k length"):
        K._run_cuda(q, k[:, :, :200], v[:, :, :200], tau, compute="flex")
