"""Issue 18 item 3: can a cheap prefilter spare the exact selection test most of its work? (CPU, measured)

    .venv/bin/python scripts/prefilter_experiment.py [--lengths 8192,16384,32768] [--demo-length 8192]

The exact test of SPEC sections 5-7 asks, for each query block a (64 rows) and visible key block b (32 keys)
outside R, whether some pair has zhat_ij > T_i + ln tau, T_i = logsumexp over R of row i's exact logits. With
D_ab = max_ij (zhat_ij - T_i) (tau-free) the block is selected iff D_ab > ln tau. A prefilter is a cheap U_ab:
- exact-safe bounds (U_ab >= D_ab, computed in float64 from the dequantized int8 values the test uses):
  * interval: per channel, the largest of the four products of the query block's and key block's min/max;
  * centroid: q_i.k_j <= qc.k_j + r_q |k_j| (qc the block's mean dequantized query, r_q its radius), exact
    qc.k_j for every key (a one-row estimate);
  * centroid2: q_i.k_j <= qc.k_j + (q_i - qc).kc + r_q r_k (key-block centroid kc and radius r_k as well);
  each ends with + max_j qm_j (in the centroid forms per key) and - min_i T_i. The minimum of them is also
  safe. A block is skipped when U_ab + SLACK <= ln tau (SLACK covers fp32 rounding of the exact test).
- an approximate one, "pooled": P_ab = scale * max_j (qc.k_j + qm_j) - min_i T_i plus a per-head margin
  delta calibrated on one sample (the largest D - P among its selected blocks, so recall is 1 there) and
  tested on a held-out sample: recall, and the per-head L1 output error (spec section 10's err) of the
  attention that drops the blocks it misses, against theta; "pooled_q99" takes the 99th percentile gap
  instead (lossy on purpose, to see whether a looser margin would prune at all).
The quantities come from the reference's own functions (quantize, _estimate, _block_ranges, _expand); the
script first checks its selection against sale_attention_reference's block map on a small input.

Inputs: bench-op's structured synthetic generator (Llama-3.1-8B shapes: 32 q / 8 kv heads, d 128; q heads
0, 5, 10, 15 = kv heads 0-3, so all four heavy-key fractions); seed 0 calibrates, seed 1 is held out. And the
demo model's Q/K/V (SmolLM2-135M, captured on CPU through the runner's prefill hook, as scripts/capture_qkv.py
does): sample A (the novel from its start, needle at depth 0.5) calibrates, sample B (the novel from 40% in,
needle at depth 0.25) is held out. Writes results/prefilter/*.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from sale_cli.kernels.reference import QMAX, _block_ranges, _estimate, _expand, quantize

BQ, BK, SINK, LOCAL = 64, 32, 32, 128  # the op's defaults
SLACK = 1e-3  # logit units; fp32 rounding of zhat and T at |logit| < 100 is below 1e-4
BOUNDS = ("interval", "centroid", "centroid2", "min")
APPROX = ("pooled", "pooled_q99")
STRUCT_HEADS = (0, 5, 10, 15)  # kv heads 0-3 of the 32/8 layout
THETA = (0.4, 0.1)  # the spec's paper setting and a tighter one, for the held-out error check


def prepare(q: torch.Tensor, k: torch.Tensor, estimate: str = "int8") -> dict:
    """Smoothing and per-token quantization exactly as sale_attention_reference does for selection.

    q [Hq, L, d], k [Hkv, L, d] (float32). The reference inlines these steps; check_against_reference()
    verifies that the selection built on them equals the reference's block map.
    """
    if q.shape[1] % BQ:
        raise ValueError(f"length {q.shape[1]}: use a multiple of {BQ}")
    G = q.shape[0] // k.shape[0]
    ks = k - k.mean(dim=1, keepdim=True)
    q_mean = q.mean(dim=1, keepdim=True)
    qm = (q_mean.unflatten(0, (-1, G)) @ ks[:, None].transpose(-1, -2)).flatten(0, 1).squeeze(1)  # [Hq, L]
    q_int, q_step = quantize(q - q_mean, QMAX[estimate], 1)
    k_int, k_step = quantize(ks, QMAX[estimate], 1)
    return {"q": q, "ks": ks, "qm": qm, "q_int": q_int, "q_step": q_step, "k_int": k_int, "k_step": k_step, "G": G}


def block_max(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    return x.unflatten(dim, (-1, size)).amax(dim + 1 if dim >= 0 else dim)


def head_margins(p: dict, h: int, scale: float, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(D [nQ, nK] fp32: max_ij zhat_ij - T_i per visible non-R block, -inf elsewhere; T [L] fp32)."""
    kv = h // p["G"]
    L = p["q"].shape[1]
    nQ, nK = L // BQ, L // BK
    visible, r_blocks = _block_ranges(L, L, BQ, BK, SINK, LOCAL)
    D = torch.full((nQ, nK), -math.inf)
    T = torch.empty(L)
    qh, ks = p["q"][h], p["ks"][kv]
    for r0 in range(0, L, chunk_rows):
        r1 = min(L, r0 + chunk_rows)
        est = _estimate(p["q_int"][h:h + 1, r0:r1], p["q_step"][h:h + 1, r0:r1], p["k_int"][kv:kv + 1, :r1],
                        p["k_step"][kv:kv + 1, :r1], p["qm"][h:h + 1, :r1], scale, 1, torch.float32)[0]
        rowmax = block_max(est, BK, 1)  # [rows, key blocks]
        del est
        for a in range(r0 // BQ, r1 // BQ):  # T_i from the exact logits over R (smoothed K, as the reference)
            rows = torch.arange(a * BQ, (a + 1) * BQ)
            kb = r_blocks[a].nonzero()[:, 0]
            keys = (kb[:, None] * BK + torch.arange(BK)).flatten()
            z = (scale * qh[rows]) @ ks[keys].T
            z.masked_fill_(keys[None, :] > rows[:, None], -math.inf)
            T[rows] = torch.logsumexp(z, dim=-1)
        D[r0 // BQ:r1 // BQ, :r1 // BK] = (rowmax - T[r0:r1, None]).unflatten(0, (-1, BQ)).amax(1)
    D.masked_fill_(~(visible & ~r_blocks), -math.inf)
    return D, T


def head_bounds(p: dict, h: int, scale: float, T: torch.Tensor) -> dict[str, torch.Tensor]:
    """Upper bounds on D (float64, [nQ, nK]) and the approximate pooled score, from the dequantized values."""
    kv = h // p["G"]
    dq = (p["q_step"][h, :, None] * p["q_int"][h]).double()  # zhat = scale * (dq_i . dk_j + qm_j)
    dk = (p["k_step"][kv, :, None] * p["k_int"][kv]).double()
    qm = p["qm"][h].double()
    L, d = dq.shape
    nQ = L // BQ
    tmin = T.double().view(nQ, BQ).amin(1)[:, None]
    qb, kb = dq.view(nQ, BQ, d), dk.view(-1, BK, d)
    qmax_blk = block_max(qm, BK, 0)[None, :]

    qhi, qlo, khi, klo = qb.amax(1), qb.amin(1), kb.amax(1), kb.amin(1)
    interval = torch.empty(nQ, kb.shape[0], dtype=torch.float64)
    for a0 in range(0, nQ, 32):
        a1 = min(nQ, a0 + 32)
        prods = torch.stack([x[a0:a1, None, :] * y[None] for x in (qhi, qlo) for y in (khi, klo)])
        interval[a0:a1] = prods.amax(0).sum(-1)
    interval = scale * (interval + qmax_blk) - tmin

    qc = qb.mean(1)  # [nQ, d]
    dev = qb - qc[:, None]
    rq = dev.norm(dim=-1).amax(1)[:, None]
    centre = qc @ dk.T + qm[None, :]  # the one-row estimate per key block: [nQ, L]
    centroid = scale * block_max(centre + rq * dk.norm(dim=-1)[None, :], BK, 1) - tmin
    kc = kb.mean(1)
    rk = (kb - kc[:, None]).norm(dim=-1).amax(1)[None, :]
    cross = block_max(dev.reshape(L, d) @ kc.T, BQ, 0)  # max_i (q_i - qc).kc: [nQ, nK]
    pooled = scale * block_max(centre, BK, 1) - tmin
    centroid2 = pooled + scale * (cross + rq * rk)
    out = {"interval": interval, "centroid": centroid, "centroid2": centroid2, "pooled": pooled}
    out["min"] = torch.minimum(torch.minimum(interval, centroid), centroid2)
    return out


def prefilter_cost(d: int) -> dict[str, float]:
    """Prefilter arithmetic per (query block, key block) pair over the exact test's BQ*BK*d int8 MACs."""
    exact = BQ * BK * d
    return {
        "exact_test_macs_per_pair": exact,
        "interval": 4 * d / exact,  # 4 products per channel (maxima and sum on top)
        "centroid": (BK * d + BK) / exact,  # qc.k_j for the block's keys + r_q |k_j|
        "centroid2": ((BK + BQ) * d + 1) / exact,  # + (q_i - qc).kc for the block's rows
        "min": (4 * d + (BK + BQ) * d + BK) / exact,
        "pooled": BK * d / exact,
        "pooled_q99": BK * d / exact,
    }


def head_masks(D, bounds, tau, deltas: dict | None = None) -> dict:
    """Per-head block statistics at one tau; asserts that the exact-safe bounds never skip a selected block.

    looseness_* is the median over candidate blocks of U - D (logit units): how far each bound sits above the
    quantity it bounds; headroom is the median of ln tau - D (what a bound would have to resolve)."""
    cand = D > -math.inf
    n = int(cand.sum())
    sel = D > math.log(tau)
    row = {"candidates": n, "selected": int(sel.sum()), "density_nonR": int(sel.sum()) / max(n, 1),
           "headroom_median": float((math.log(tau) - D[cand]).median())}
    for name in BOUNDS:
        keep = cand & (bounds[name] + SLACK > math.log(tau))
        missed = int((sel & ~keep).sum())
        assert missed == 0, f"exact-safe bound {name} skipped {missed} selected blocks at tau {tau}"
        row[f"tested_{name}"] = int(keep.sum()) / max(n, 1)
        row[f"recall_{name}"] = 1.0
        row[f"looseness_{name}"] = float((bounds[name][cand] - D[cand].double()).median())
    masks = {"sel": sel}
    for name, delta in (deltas or {}).items():
        keep = cand & (bounds["pooled"] + delta > math.log(tau))
        masks[name] = sel & keep
        row[f"tested_{name}"] = int(keep.sum()) / max(n, 1)
        row[f"recall_{name}"] = _recall(int((sel & keep).sum()), int(sel.sum()))
        row[f"missed_{name}"] = int((sel & ~keep).sum())
        row[f"delta_{name}"] = delta
    return row, masks


def _recall(kept: int, selected: int) -> float:
    return kept / selected if selected else 1.0  # nothing to miss


def calibrate_deltas(D, pooled, tau) -> dict[str, float]:
    """Margins for P_ab + delta > ln tau from one sample's gaps D - P among its blocks selected at tau (all
    candidate blocks if none is): "pooled" = the largest gap (recall 1 on this sample), "pooled_q99" = the 99th
    percentile (recall ~0.99: the lossy variant, to see what a looser margin would buy)."""
    sel = D > math.log(tau)
    gap = (D.double() - pooled)[sel if bool(sel.any()) else D > -math.inf]
    return {"pooled": float(gap.max()) + SLACK, "pooled_q99": float(gap.quantile(0.99)) + SLACK}


def head_errors(p: dict, h: int, v: torch.Tensor, scale: float, masks: dict, chunk_rows: int) -> dict:
    """Spec section 10's err = sum |o - o_dense| / L for each block mask (R is added here)."""
    kv = h // p["G"]
    L = p["q"].shape[1]
    visible, r_blocks = _block_ranges(L, L, BQ, BK, SINK, LOCAL)
    qh, ks, vv = p["q"][h], p["ks"][kv], v[kv]
    err = dict.fromkeys(masks, 0.0)
    for r0 in range(0, L, chunk_rows):
        r1 = min(L, r0 + chunk_rows)
        rows, keys = torch.arange(r0, r1), torch.arange(r1)
        causal = keys[None, :] <= rows[:, None]
        z = ((scale * qh[r0:r1]) @ ks[:r1].T).masked_fill_(~causal, -math.inf)
        dense = torch.softmax(z, dim=-1) @ vv[:r1]
        done: list[tuple[torch.Tensor, float]] = []
        for name, m in masks.items():
            blk = (m | r_blocks)[r0 // BQ:r1 // BQ, :r1 // BK]
            same = [e for b, e in done if torch.equal(b, blk)]
            if same:
                err[name] += same[0]
                continue
            o = torch.softmax(z.masked_fill(~_expand(blk, BQ, BK, r1 - r0, r1), -math.inf), dim=-1) @ vv[:r1]
            e = float((o - dense).abs().sum())
            done.append((blk, e))
            err[name] += e
    return {name: e / L for name, e in err.items()}


def check_against_reference(scale_len: int = 2048) -> int:
    """Our D > ln tau must equal the reference's selected non-R blocks; returns the number of differing blocks."""
    from sale_cli.data.synthetic_qkv import structured_qkv as make_structured
    from sale_cli.kernels.reference import sale_attention_reference

    q, k, v = make_structured(scale_len, 8, 2, 64, torch.bfloat16, seed=3, device="cpu")
    q, k, v = q.float(), k.float(), v.float()
    scale = 1 / math.sqrt(q.shape[-1])
    p = prepare(q[0], k[0])
    visible, r_blocks = _block_ranges(scale_len, scale_len, BQ, BK, SINK, LOCAL)
    diff = 0
    for tau in (0.2, 0.008, 0.001):
        _, _, bmap, _ = sale_attention_reference(
            q, k, v, torch.full((8,), tau), scale=scale, block_q=BQ, block_k=BK, sink_tokens=SINK,
            local_window=LOCAL, estimate="int8", quant_group="per_token", dense=False, need_block_map=True,
            need_lse=False)
        for h in range(8):
            D, _ = head_margins(p, h, scale, 1024)
            diff += int(((D > math.log(tau)) != (bmap[0, h] & ~r_blocks & visible)).sum())
    return diff


def analyse(name: str, calib: tuple, held: tuple, heads, taus, scale, chunk_rows, errors: bool, log,
            thetas=()) -> dict:
    """Calibrate on `calib` (q, k, v), report on both; held-out output errors when `errors`; with `thetas`,
    also each head's tau calibrated for theta on `calib` (theta_runs)."""
    res = {"input": name, "heads": list(heads), "taus": list(taus), "per_head": []}
    pc, ph = prepare(calib[0], calib[1]), prepare(held[0], held[1])
    for h in heads:
        t0 = time.perf_counter()
        Dc, Tc = head_margins(pc, h, scale, chunk_rows)
        bc = head_bounds(pc, h, scale, Tc)
        Dh, Th = head_margins(ph, h, scale, chunk_rows)
        bh = head_bounds(ph, h, scale, Th)
        entries, all_masks = [], {}
        for tau in taus:
            deltas = calibrate_deltas(Dc, bc["pooled"], tau)
            row_c, _ = head_masks(Dc, bc, tau, deltas)
            row_h, masks = head_masks(Dh, bh, tau, deltas)
            entries.append({"head": h, "tau": tau, "calibration": row_c, "held_out": row_h})
            all_masks.update({(tau, k): m for k, m in masks.items()})
        if errors:  # one pass over the logits for every tau and mask
            errs = head_errors(ph, h, held[2], scale, all_masks, chunk_rows)
            for e in entries:
                e["held_out"]["err"] = {k: v for (tau, k), v in errs.items() if tau == e["tau"]}
        for e in entries:
            res["per_head"].append(e)
            log(f"{name} head {h} tau {e['tau']}: {summary_line(e)}")
        if thetas:
            res.setdefault("theta_runs", []).extend(theta_runs(pc, ph, calib, held, h, Dc, bc, Dh, bh, scale,
                                                               chunk_rows, thetas, name, log))
        log(f"{name} head {h}: {time.perf_counter() - t0:.0f} s")
    return res


def theta_runs(pc, ph, calib, held, h, Dc, bc, Dh, bh, scale, chunk_rows, thetas, name, log) -> list[dict]:
    """Spec section 10 on this one (layer, head) and calibration sample: tau halves from 0.008 while the exact
    selection's err >= theta (0 = dense once it would fall to 1e-4 or below); then the held-out sample at that
    tau: the exact selection's and the approximate prefilters' err against theta."""
    ladder = [0.008 / 2**n for n in range(7)]
    cal_err = head_errors(pc, h, calib[2], scale, {t: Dc > math.log(t) for t in ladder}, chunk_rows)
    runs = []
    for theta in thetas:
        tau = next((t for t in ladder if cal_err[t] < theta), 0.0)
        run = {"head": h, "theta": theta, "tau": tau, "calibration_err": cal_err.get(tau, 0.0)}
        if tau > 0:
            deltas = calibrate_deltas(Dc, bc["pooled"], tau)
            run["calibration"], _ = head_masks(Dc, bc, tau, deltas)
            run["held_out"], masks = head_masks(Dh, bh, tau, deltas)
            run["held_out"]["err"] = head_errors(ph, h, held[2], scale, masks, chunk_rows)
            log(f"{name} head {h} theta {theta}: tau {tau:g} {summary_line(run)}")
        else:
            log(f"{name} head {h} theta {theta}: dense (tau 0)")
        runs.append(run)
    return runs


def summary_line(e: dict) -> str:
    c, h = e["calibration"], e["held_out"]
    s = (f"dens {c['density_nonR']:.3f}/{h['density_nonR']:.3f} tested " +
         " ".join(f"{b} {c[f'tested_{b}']:.3f}/{h[f'tested_{b}']:.3f}" for b in (*BOUNDS, *APPROX)) +
         " loose " + " ".join(f"{h[f'looseness_{b}']:.1f}" for b in BOUNDS) + f" headroom {h['headroom_median']:.1f}"
         + " recall " + " ".join(f"{h[f'recall_{b}']:.4f}" for b in APPROX))
    if "err" in h:
        s += " err " + " ".join(f"{k} {v:.4f}" for k, v in h["err"].items())
    return s


def capture_demo(length: int, layers: list[int], start_frac: float, depth: float) -> dict:
    """Q/K/V after RoPE of the demo model's chosen layers (bf16), as scripts/capture_qkv.py takes them."""
    from sale_cli.eval.niah import NiahPromptBuilder, load_haystack
    from sale_cli.runner import load_runner

    runner = load_runner("smollm2-135m", method="dense", device="cpu", dtype="float32")
    text = load_haystack()
    text = text[int(start_frac * len(text)):]
    builder = NiahPromptBuilder(runner.tokenizer, text, chat_template=runner.apply_chat_template)
    prompt = builder.build(length, depth=depth)
    found: dict = {}

    def hook(layer, q, k, v, dense_out, scale):
        if layer in layers:
            found[layer] = (*(t.detach().to(torch.bfloat16).clone() for t in (q, k, v)), float(scale))

    runner.state.hook = hook
    try:
        runner.prefill(prompt.input_ids)
    finally:
        runner.state.hook = None
    return {"layers": layers, "found": found, "start_frac": start_frac, "depth": depth, "length": length}


def load_or_capture(path: Path, length, layers, start_frac, depth, log) -> dict:
    if path.exists():
        data = torch.load(path)
        if data["length"] == length and data["layers"] == layers and data["start_frac"] == start_frac:
            return data
    t0 = time.perf_counter()
    data = capture_demo(length, layers, start_frac, depth)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    log(f"captured {path} in {time.perf_counter() - t0:.0f} s")
    return data


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def tables(out: Path) -> str:
    """Markdown tables from the JSON files under `out` (held-out sample; means over heads)."""
    files = sorted(out.glob("structured_*.json"), key=lambda f: int(f.stem.split("_")[1]))
    files += sorted(out.glob("demo_layer*.json"), key=lambda f: int(f.stem[len("demo_layer"):]))
    res = [json.loads(f.read_text()) for f in files]
    names = (*BOUNDS, *APPROX)
    lines = ["| input | tau | density (non-R) | " + " | ".join(f"tested {n}" for n in names) +
             " | pooled recall (min) | saving min-bound | saving pooled | saving pooled_q99 | err exact (max) | "
             "err pooled (max) | err increase pooled / q99 (max) |", "|---" * (len(names) + 10) + "|"]
    for r in res:
        cost = r["cost"]
        for tau in r["taus"]:
            hs = [e["held_out"] for e in r["per_head"] if e["tau"] == tau]
            for h in hs:
                h["recall_pooled"] = _recall(h["selected"] - h["missed_pooled"], h["selected"])
            tested = {n: _mean(h[f"tested_{n}"] for h in hs) for n in names}
            err = [h["err"] for h in hs if "err" in h]
            lines.append(
                f"| {r['input']} | {tau:g} | {_mean(h['density_nonR'] for h in hs):.3f} | "
                + " | ".join(f"{tested[n]:.3f}" for n in names)
                + f" | {min(h['recall_pooled'] for h in hs):.4f} | {1 - tested['min'] - cost['min']:+.3f} | "
                f"{1 - tested['pooled'] - cost['pooled']:+.3f} | {1 - tested['pooled_q99'] - cost['pooled_q99']:+.3f}"
                + (f" | {max(e['sel'] for e in err):.3f} | {max(e['pooled'] for e in err):.3f} | "
                   f"{max(e['pooled'] - e['sel'] for e in err):.4f} / "
                   f"{max(e['pooled_q99'] - e['sel'] for e in err):.4f} |" if err else " | - | - | - |"))
    lines += ["", "| input | theta | taus (calibrated on sample A) | density (non-R) | tested pooled | saving pooled |"
              " pooled recall (min) | heads exact err >= theta | heads pooled err >= theta (exact below) | max err exact | "
              "max err pooled | max err increase | dense heads |", "|---" * 13 + "|"]
    for r in res:
        for theta in THETA:
            runs = [x for x in r.get("theta_runs", []) if x["theta"] == theta]
            if not runs:
                continue
            sparse = [x for x in runs if x["tau"] > 0]
            hs = [x["held_out"] for x in sparse]
            for h in hs:
                h["recall_pooled"] = _recall(h["selected"] - h["missed_pooled"], h["selected"])
            taus = sorted({x["tau"] for x in sparse}, reverse=True)
            if not hs:
                lines.append(f"| {r['input']} | {theta} |" + " - |" * 10 + f" {len(runs)} |")
                continue
            tested = _mean(h["tested_pooled"] for h in hs)
            lines.append(
                f"| {r['input']} | {theta} | {', '.join(f'{t:g}' for t in taus)} | "
                f"{_mean(h['density_nonR'] for h in hs):.3f} | {tested:.3f} | "
                f"{1 - tested - r['cost']['pooled']:+.3f} | {min(h['recall_pooled'] for h in hs):.4f} | "
                f"{sum(h['err']['sel'] >= theta for h in hs)} | {sum(h['err']['pooled'] >= theta for h in hs)} "
                f"({sum(h['err']['pooled'] >= theta > h['err']['sel'] for h in hs)}) | "
                f"{max(h['err']['sel'] for h in hs):.3f} | {max(h['err']['pooled'] for h in hs):.3f} | "
                f"{max(h['err']['pooled'] - h['err']['sel'] for h in hs):.4f} | {len(runs) - len(sparse)} |")
    lines += ["", "| input | tau | headroom ln tau - D (median) | " +
              " | ".join(f"looseness {n} (median U - D)" for n in BOUNDS) + " |", "|---" * (len(BOUNDS) + 3) + "|"]
    for r in res:
        for tau in r["taus"]:
            hs = [e["held_out"] for e in r["per_head"] if e["tau"] == tau]
            lines.append(f"| {r['input']} | {tau:g} | {_mean(h['headroom_median'] for h in hs):.1f} | " +
                         " | ".join(f"{_mean(h[f'looseness_{n}'] for h in hs):.1f}" for n in BOUNDS) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="8192,16384,32768", help="structured input lengths")
    ap.add_argument("--error-max-length", type=int, default=8192,
                    help="held-out output errors only up to this structured length (CPU time)")
    ap.add_argument("--taus", default="0.2,0.008,0.001")
    ap.add_argument("--demo-length", type=int, default=4096)
    ap.add_argument("--demo-layers", default="3,10,17,25")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--skip-structured", action="store_true")
    ap.add_argument("--out", default="results/prefilter")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tables", action="store_true", help="print the markdown tables of --out's JSON and stop")
    args = ap.parse_args(argv)
    if args.tables:
        print(tables(Path(args.out)))
        return
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    out = Path(args.out)
    taus = [float(x) for x in args.taus.split(",")]

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch threads "
                       f"{args.threads}", "torch": torch.__version__, "slack": SLACK, "bq": BQ, "bk": BK,
            "local_window": LOCAL, "sink": SINK, "estimate": "int8 per_token"}
    diff = check_against_reference()
    log(f"selection vs sale_attention_reference block map (2K, 8 heads, 3 taus): {diff} differing blocks")
    assert diff == 0, "the experiment's selection disagrees with the reference"
    meta["reference_check_differing_blocks"] = diff

    if not args.skip_structured:
        from sale_cli.data.synthetic_qkv import structured_qkv as make_structured

        for L in (int(x) for x in args.lengths.split(",")):
            sets = [make_structured(L, 32, 8, 128, torch.bfloat16, seed=s, device="cpu") for s in (0, 1)]
            sets = [tuple(t[0, list(STRUCT_HEADS) if i == 0 else list(range(4))].float() for i, t in enumerate(x))
                    for x in sets]  # q heads 0, 5, 10, 15 -> kv heads 0..3: one q head per kv head now
            res = analyse(f"structured-{L}", sets[0], sets[1], range(4), taus, 1 / math.sqrt(128),
                          max(256, (1 << 23) // L), L <= args.error_max_length, log)
            res["q_heads"] = list(STRUCT_HEADS)
            res["length"] = L
            res["cost"] = prefilter_cost(128)
            res["meta"] = meta
            write_json(out / f"structured_{L}.json", res)
            del sets

    if not args.skip_demo:
        layers = [int(x) for x in args.demo_layers.split(",")]
        a = load_or_capture(out / f"qkv_A_{args.demo_length}.pt", args.demo_length, layers, 0.0, 0.5, log)
        b = load_or_capture(out / f"qkv_B_{args.demo_length}.pt", args.demo_length, layers, 0.4, 0.25, log)
        for layer in layers:
            qa, ka, va, scale = a["found"][layer]
            qb_, kb_, vb, _ = b["found"][layer]
            calib = (qa[0].float(), ka[0].float(), va[0].float())
            held = (qb_[0].float(), kb_[0].float(), vb[0].float())
            res = analyse(f"demo-L{layer}", calib, held, range(qa.shape[1]), taus, scale, 1024, True, log, THETA)
            res.update(layer=layer, length=args.demo_length, cost=prefilter_cost(qa.shape[-1]), meta=meta)
            write_json(out / f"demo_layer{layer}.json", res)


if __name__ == "__main__":
    main()
