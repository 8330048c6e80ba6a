"""The density above which a head is faster dense: measured per GPU architecture with `sale bench-op`.

A SALE head costs its selection (growing slowly with density) plus computation proportional to its density;
dense attention through cuDNN costs a fixed amount. Above the break-even density the head is cheaper dense, so
calibration sets its tau to 0 (`sale calibrate --dense-above`). The break-even rises with the sequence length
(the selection's share shrinks). Figures and commands: docs/BENCHMARKS.md (`scripts/break_even.py`).
"""

from __future__ import annotations

import math

import torch

# compute capability -> ({tokens: break-even density}, where it was measured)
MEASURED: dict[tuple[int, int], tuple[dict[int, float], str]] = {
    (9, 0): ({32768: 0.395, 65536: 0.434, 131072: 0.47}, "H200, sale bench-op, 2026-12-03"),
}
FALLBACK = (9, 0)  # the architecture whose figures stand in for one not measured


def at_length(points: dict[int, float], tokens: int) -> float:
    """The break-even at ``tokens``: linear in log2(tokens) between measured lengths, the nearest end outside."""
    lengths = sorted(points)
    x = min(max(tokens, lengths[0]), lengths[-1])
    lo = max(n for n in lengths if n <= x)
    hi = min(n for n in lengths if n >= x)
    if lo == hi:
        return points[lo]
    w = (math.log2(x) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
    return round(points[lo] + w * (points[hi] - points[lo]), 3)


def default_dense_above(device: torch.device | str | None = None, tokens: int = 131072) -> tuple[float, str]:
    """(break-even density at ``tokens``, its source) for ``device``'s GPU architecture; an architecture not
    measured takes the Hopper figures; off the GPU (no architecture to measure) the rule is off: 1.0."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return 1.0, "not applied: calibrated off the GPU (set --dense-above to apply it)"
    cc = torch.cuda.get_device_capability(device)
    points, source = MEASURED.get(cc, MEASURED[FALLBACK])
    where = f"{source}, at {tokens} tokens"
    if cc not in MEASURED:
        where += f"; sm_{cc[0]}{cc[1]} not measured, sm_{FALLBACK[0]}{FALLBACK[1]}'s figures"
    return at_length(points, tokens), where


DENSE_ABOVE_RULE = "must be a density in (0, 1] (1 keeps every head sparse)"


def dense_above_ok(value) -> bool:
    return isinstance(value, (int, float)) and 0 < value <= 1


def check_dense_above(value: float) -> float:
    """``value`` if it is a density in (0, 1]; 1 keeps every head sparse."""
    if not dense_above_ok(value):
        raise ValueError(f"--dense-above {DENSE_ABOVE_RULE}, got {value!r}")
    return float(value)
