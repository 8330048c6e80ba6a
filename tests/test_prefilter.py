"""The prefilter experiment's bounds (scripts/prefilter_experiment.py): upper bounds, exact margins, the guard."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prefilter_experiment.py"


@pytest.fixture(scope="module")
def pf():
    spec = importlib.util.spec_from_file_location("prefilter_experiment", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _inputs(seed: int, L: int = 512, d: int = 32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, L, d, generator=g) * torch.rand(1, 1, d, generator=g) * 3  # uneven channels
    k = torch.randn(1, L, d, generator=g) + 2.0 * torch.randn(1, 1, d, generator=g)  # a shared offset
    k[0, 0] *= 6  # a loud sink key
    return q, k


def _oracle_margins(p, h, scale, T):
    """max_ij zhat_ij - T_i per (query block, key block) in float64, brute force over all pairs."""
    dq = (p["q_step"][h, :, None] * p["q_int"][h]).double()
    dk = (p["k_step"][0, :, None] * p["k_int"][0]).double()
    zhat = scale * (dq @ dk.T + p["qm"][h].double()[None, :]) - T.double()[:, None]
    L = zhat.shape[0]
    return zhat.view(L // 64, 64, L // 32, 32).amax(dim=(1, 3))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_safe_bounds_are_upper_bounds(pf, seed):
    q, k = _inputs(seed)
    scale = 1 / math.sqrt(q.shape[-1])
    p = pf.prepare(q, k)
    for h in range(2):
        D, T = pf.head_margins(p, h, scale, chunk_rows=256)
        cand = D > -math.inf
        assert int(cand.sum()) > 0
        oracle = _oracle_margins(p, h, scale, T)
        assert torch.allclose(D[cand].double(), oracle[cand], atol=1e-4)
        bounds = pf.head_bounds(p, h, scale, T)
        for name in pf.BOUNDS:
            gap = bounds[name][cand] - oracle[cand]
            assert float(gap.min()) >= -pf.SLACK, f"{name} is below the exact margin by {-float(gap.min())}"
        # The pooled score is the centroid's estimate, not a bound: it must sit below the centroid bound.
        assert bool((bounds["pooled"] <= bounds["centroid2"] + 1e-9).all())


def test_guard_catches_a_bound_that_skips_a_selected_block(pf):
    q, k = _inputs(3)
    scale = 1 / math.sqrt(q.shape[-1])
    p = pf.prepare(q, k)
    D, T = pf.head_margins(p, 0, scale, chunk_rows=256)
    bounds = pf.head_bounds(p, 0, scale, T)
    tau = math.exp(float(D[D > -math.inf].median()))  # half the candidate blocks are selected
    row, _ = pf.head_masks(D, bounds, tau)
    assert 0 < row["density_nonR"] < 1
    bounds["interval"] = D.double() - 1.0  # a "bound" below the true margin
    with pytest.raises(AssertionError, match="interval skipped"):
        pf.head_masks(D, bounds, tau)


def test_selection_matches_the_reference_block_map(pf):
    assert pf.check_against_reference(1024) == 0
