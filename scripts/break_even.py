"""The break-even density from `sale bench-op` JSON: where the op's time (against density, over the SALE rows of
one length, all data kinds and taus, tau 0 left out) crosses cuDNN's, by linear interpolation between the
neighbouring measured densities. Usage: python scripts/break_even.py BENCH_OP.json [...]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def break_even(rows: list[dict]) -> dict[int, dict]:
    by_length: dict[int, dict] = defaultdict(lambda: {"sale": [], "cudnn": []})
    for r in rows:
        if r.get("error") or r.get("ms") is None:
            continue
        if r["method"].startswith("sdpa") and r["backend"] == "cudnn":
            by_length[r["length"]]["cudnn"].append(r["ms"])
        elif r["method"] == "sale" and r.get("tau") not in (None, 0) and r.get("granularity") in (None, "64x32"):
            by_length[r["length"]]["sale"].append((r["density"], r["ms"]))
    out = {}
    for length, d in sorted(by_length.items()):
        if not d["cudnn"] or len(d["sale"]) < 2:
            continue
        dense_ms = min(d["cudnn"])
        points = sorted(d["sale"])
        cross = None
        for (d0, t0), (d1, t1) in zip(points, points[1:], strict=False):
            if t0 <= dense_ms <= t1 and d1 > d0:
                cross = d0 + (dense_ms - t0) * (d1 - d0) / (t1 - t0)
                break
        out[length] = {"cudnn_ms": dense_ms, "break_even_density": cross, "points": points}
    return out


def main() -> None:
    rows = [r for path in sys.argv[1:] for r in json.load(open(path))["rows"]]
    for length, r in break_even(rows).items():
        be = "none in range" if r["break_even_density"] is None else f"{r['break_even_density']:.3f}"
        pts = ", ".join(f"{d:.3f}: {t:.1f}" for d, t in r["points"])
        print(f"{length}: cuDNN {r['cudnn_ms']:.1f} ms, break-even density {be}  (density: ms  {pts})")


if __name__ == "__main__":
    main()
