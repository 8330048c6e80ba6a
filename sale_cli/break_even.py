"""The density above which a head is faster dense: measured per GPU architecture with `sale bench-op`.

A SALE head costs its selection (growing slowly with density) plus computation proportional to its density; dense attention
through cuDNN costs a fixed amount. Above the break-even density the head is cheaper dense, so calibration sets
its tau to 0 (`sale calibrate --dense-above`). Figures and commands: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import torch

# compute capability -> (break-even density, where it was measured)
MEASURED: dict[tuple[int, int], tuple[float, str]] = {
    (9, 0): (0.47, "H200, sale bench-op at 128K tokens, 2026-12-03"),
}
FALLBACK = (9, 0)  # the architecture whose figure stands in for one not measured


def default_dense_above(device: torch.device | str | None = None) -> tuple[float, str]:
    """(break-even density, its source) for ``device``'s GPU architecture; an architecture not measured takes the
    Hopper figure; off the GPU (no architecture to measure) the rule is off: 1.0."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return 1.0, "not applied: calibrated off the GPU (set --dense-above to apply it)"
    cc = torch.cuda.get_device_capability(device)
    if cc in MEASURED:
        return MEASURED[cc]
    value, source = MEASURED[FALLBACK]
    return value, f"{source}; sm_{cc[0]}{cc[1]} not measured"


def check_dense_above(value: float) -> float:
    """``value`` if it is a density in (0, 1]; 1 keeps every head sparse."""
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ValueError(f"--dense-above must be a density in (0, 1] (1 keeps every head sparse), got {value!r}")
    return float(value)
