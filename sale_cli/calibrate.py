"""Per-head threshold calibration (docs/SPEC.md, section 10) and the held-out check of its bound.

One dense forward per sample; at every layer the hook compares each head's SALE output with the dense one
(the dense output goes on to the next layer, so errors do not compound) and halves tau while the error is
>= the bound. Tau carries over between samples. With the runner's prefill chunk, each chunk's attention call is
one comparison (tau carries over between chunks as between samples); the file records the chunk. Progress
is saved after every sample, so an interrupted run resumes without redoing finished samples.

Beyond the spec (docs/CALIBRATION.md): the samples cycle over several kinds of text (``data="mix"``), and tau is
fitted against ``theta * (1 - margin)`` so that text not seen in calibration stays below theta itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sale_cli import thresholds as thresholds_io
from sale_cli.break_even import check_dense_above, default_dense_above
from sale_cli.data.calibration import KINDS, VALIDATION_SEED0, CalibrationData, validation_samples
from sale_cli.errors import UserError
from sale_cli.kernels import sale_attention
from sale_cli.kernels.constants import TAU0
from sale_cli.runner import Runner

DEFAULT_THETA = 0.4  # the paper's theta for Llama-3.1-8B; `sale calibrate` and `sale latency` default to it
FLOOR = 1e-4
MARGIN = 0.25  # fit against theta * (1 - MARGIN): the headroom for text unlike the calibration samples
PAPER_SAMPLES, PAPER_TOKENS = 6, 120_000
MIN_TOKENS = 64  # the smallest calibration sample (sale_cli.data.calibration)
DEMO_SAMPLES, DEMO_TOKENS = 3, 2048  # mix: one sample of each kind (CPU-sized)
VALIDATE_PER_KIND = 3
TARGET_BELOW, TARGET_WORST = 0.97, 1.5  # the check's pass mark: share of heads below theta, worst error / theta
WORST_SHOWN = 5


def head_errors(q, k, v, dense_out, tau: torch.Tensor, scale, op_kwargs: dict,
                heads: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's err (sum over rows and channels |O_sale - O_dense| / Lq, mean over the batch) and density.

    Only kv groups holding a head of ``heads`` (bool [Hq], default all) are computed; the others read 0 and 1.
    Returns CPU float tensors [Hq].
    """
    Hq, Hkv = q.shape[1], k.shape[1]
    G = Hq // Hkv
    heads = torch.ones(Hq, dtype=torch.bool) if heads is None else heads
    groups = heads.view(Hkv, G).any(dim=1)
    sel = groups.repeat_interleave(G)
    err, density = torch.zeros(Hq), torch.ones(Hq)
    res = sale_attention(q[:, sel], k[:, groups], v[:, groups], tau[sel].to(q.device), scale=scale, **op_kwargs,
                         return_density=True)
    err[sel] = ((res.out.float() - dense_out[:, sel].float()).abs().sum(dim=(2, 3)).mean(0) / q.shape[2]).cpu()
    density[sel] = res.density.float().mean(0).cpu()
    return err, density


@dataclass
class LayerSearch:
    """Halving search over one layer's heads on one sample; remembers the accepted density per head.

    A head's tau is halved while its error is >= ``theta * (1 - margin)``.
    """

    theta: float
    floor: float = FLOOR
    margin: float = 0.0

    @property
    def bound(self) -> float:
        return self.theta * (1 - self.margin)

    def run(self, tau: torch.Tensor, q, k, v, dense_out, scale, op_kwargs) -> torch.Tensor:
        """Update ``tau`` [Hq] (CPU, in place); return the density of each head at its accepted tau."""
        density = torch.ones(q.shape[1])
        active = tau > 0
        while active.any():
            err, dens = head_errors(q, k, v, dense_out, tau, scale, op_kwargs, heads=active)
            density[active] = dens[active]
            failing = active & (err >= self.bound)
            tau[failing] /= 2
            tau[failing & (tau <= self.floor)] = 0.0
            density[tau == 0] = 1.0
            active = failing & (tau > 0)
        return density


def _partial_path(out: Path) -> Path:
    return out.with_name(out.stem + ".partial.safetensors")


def check_path(thresholds_path: Path) -> Path:
    """Where the held-out check of a thresholds file goes: theta_0.4.safetensors -> theta_0.4.check.json."""
    return thresholds_path.with_name(thresholds_path.stem + ".check.json")


def _counter(runner: Runner) -> Callable[[str], int]:
    tok = runner.tokenizer
    return lambda text: len(tok(runner.apply_chat_template(text), add_special_tokens=False).input_ids)


def _ids(runner: Runner, text: str) -> list[int]:
    return runner.tokenizer(runner.apply_chat_template(text), add_special_tokens=False).input_ids


def _hooked_prefill(runner: Runner, ids: list[int], hook: Callable):
    """A dense prefill that calls ``hook(layer, q, k, v, dense_out, scale)`` at every attention layer."""
    runner.set_method("dense")
    with runner.capture(hook):
        runner.prefill(ids)


def _check_args(runner: Runner, theta: float, tokens: int):
    if theta <= 0:
        raise UserError(f"--theta must be > 0, got {theta}")
    if runner.max_context and tokens > runner.max_context:
        raise UserError(f"--tokens {tokens} exceeds the model's context limit ({runner.max_context})")


def _bar(console: Console, progress: bool) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console, disable=not progress)


def calibrate(runner: Runner, theta: float, *, samples: int, tokens: int, out: Path, tau0: float = TAU0,
              data: str = "mix", margin: float = MARGIN, dense_above: float | None = None,
              console: Console | None = None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrate thresholds for ``runner``'s model; returns (thresholds [L, H], density [L, H]).

    ``data`` is a built-in kind (kv, prose, code), "mix" (cycling over them) or a .txt/.jsonl file or folder.
    The density of a head is the mean over samples (and chunks) of its density at the tau accepted there. Heads
    whose density exceeds ``dense_above`` (default: the break-even density of this GPU architecture,
    :mod:`sale_cli.break_even`; 1 = never) get tau 0: they run dense, which is faster than SALE above it.
    Writes ``out`` at the end (thresholds, the density, the rule in the metadata);
    ``<out>.partial.safetensors`` holds finished samples while running.
    """
    if not (math.isfinite(theta) and theta > 0):
        raise ValueError(f"theta must be a finite number > 0, got {theta}")
    if not (math.isfinite(tau0) and tau0 >= 0):
        raise ValueError(f"tau0 must be a finite number >= 0, got {tau0}")
    _check_args(runner, theta, tokens)
    if samples < 1:
        raise UserError(f"--samples must be >= 1, got {samples}")
    if samples > VALIDATION_SEED0:
        raise UserError(f"--samples must be <= {VALIDATION_SEED0} (higher seeds are kept for the held-out check)")
    if not 0 <= margin < 1:
        raise UserError(f"--margin must be in [0, 1), got {margin}")
    if dense_above is None:
        dense_above, dense_source = default_dense_above(runner.device, tokens)
    else:
        dense_above, dense_source = check_dense_above(dense_above), "set by the user (--dense-above)"
    console = console or Console()
    source = CalibrationData(data)
    extra = {"data": data, "data_samples": source.labels(samples), "margin": f"{margin:g}",
             "validation_seed0": str(VALIDATION_SEED0), "dense_above": f"{dense_above:g}",
             "dense_above_source": dense_source}
    meta = dict(model=runner.model_name, theta=theta, tau0=tau0, tokens=tokens, options=runner.options,
                prefill_chunk=runner.prefill_chunk)
    tau = torch.full((runner.num_layers, runner.num_heads), tau0, dtype=torch.float32)
    dens_sum, dens_n = torch.zeros_like(tau), torch.zeros(runner.num_layers, 1)
    done = 0
    partial = _partial_path(out)
    if partial.is_file():
        try:
            tau, saved = thresholds_io.load(partial, num_layers=runner.num_layers, num_heads=runner.num_heads,
                                            options=runner.options, model=runner.model_name)
            same = saved.get("theta") == f"{theta:g}" and saved.get("tau0") == f"{tau0:g}" and \
                saved.get("tokens") == str(tokens) and saved.get("prefill_chunk") == str(runner.prefill_chunk) \
                and saved.get("data") == data and saved.get("margin") == f"{margin:g}"
            done = int(saved["samples"]) if same else 0
            saved_density = thresholds_io.load_density(partial) if same else None
            if saved_density is not None:  # the running mean so far, weighted as one call per sample and layer
                dens_sum, dens_n = saved_density * done, torch.full_like(dens_n, done)
        except (ValueError, KeyError) as exc:
            raise UserError(f"{exc} ({partial} holds an interrupted calibration: delete it to start afresh)") from exc
        if same:
            console.print(f"Resuming from {partial}: {done} of {samples} samples done.")
        else:
            tau = torch.full_like(tau, tau0)
    search = LayerSearch(theta, margin=margin)
    op_kwargs = runner.options.op_kwargs()
    count = _counter(runner)

    with _bar(console, progress) as bar:
        sample_task = bar.add_task("samples", total=samples, completed=done)
        layer_task = bar.add_task("layers", total=runner.num_layers)

        def hook(layer, q, k, v, dense_out, scale):
            dens_sum[layer] += search.run(tau[layer], q, k, v, dense_out, scale, op_kwargs)
            dens_n[layer] += 1
            bar.advance(layer_task)

        for index in range(done, samples):
            sample = source.sample(index, tokens, count)
            ids = _ids(runner, sample.text)
            calls = runner.num_layers * len(runner.chunk_bounds(len(ids)))  # the hook runs per layer and chunk
            bar.reset(layer_task, total=calls,
                      description=f"layers (sample {index + 1}, {sample.label}, {len(ids)} tokens)")
            _hooked_prefill(runner, ids, hook)
            thresholds_io.save(partial, tau, samples=index + 1, **meta, extra=extra,
                               density=_mean_density(dens_sum, dens_n))
            bar.advance(sample_task)
    density = _mean_density(dens_sum, dens_n)
    rule = (density > dense_above) & (tau > 0)
    tau[rule] = 0.0
    density[tau == 0] = 1.0
    extra["dense_by_rule"] = str(int(rule.sum()))
    console.print(f"Dense-heads rule: density above {dense_above:g} -> tau 0 for {int(rule.sum())} heads "
                  f"({dense_source})")
    thresholds_io.save(out, tau, samples=samples, **meta, extra=extra, density=density)
    partial.unlink(missing_ok=True)
    return tau, density


def _mean_density(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.where(count > 0, total / count.clamp(min=1), torch.ones_like(total))


# ---------------------------------------------------------------------------------------------------------------
# the held-out check


def measure(runner: Runner, tau: torch.Tensor, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(err [L, H], density [L, H]) of every head at ``tau`` on one prompt, the way calibration measures it."""
    op_kwargs = runner.options.op_kwargs()
    err, density = torch.zeros_like(tau), torch.ones_like(tau)

    def hook(layer, q, k, v, dense_out, scale):
        err[layer], density[layer] = head_errors(q, k, v, dense_out, tau[layer], scale, op_kwargs)

    _hooked_prefill(runner, ids, hook)
    return err, density


def _kind_report(tau: torch.Tensor, theta: float, seeds: list[int], errs: list[torch.Tensor],
                 dens: list[torch.Tensor]) -> dict:
    err = torch.stack(errs)  # [samples, L, H]
    worst = err.amax(0)
    order = worst.flatten().argsort(descending=True)[:WORST_SHOWN].tolist()
    H = tau.shape[1]
    below = (err < theta).float().mean().item()
    report = {
        "seeds": seeds,
        "heads_below_theta": below,  # over (sample, head) pairs
        "heads_below_theta_per_sample": [(e < theta).float().mean().item() for e in err],
        "heads_below_theta_every_sample": (worst < theta).float().mean().item(),
        "max_error": worst.max().item(),
        "max_error_over_theta": worst.max().item() / theta,
        "mean_error": err.mean().item(),
        "mean_density": torch.stack(dens).mean().item(),
        "worst_heads": [{"layer": i // H, "head": i % H, "error": worst.flatten()[i].item(),
                         "tau": tau.flatten()[i].item()} for i in order],
    }
    report["meets_target"] = below >= TARGET_BELOW and report["max_error_over_theta"] <= TARGET_WORST
    return report


def check(runner: Runner, tau: torch.Tensor, theta: float, *, tokens: int, per_kind: int = VALIDATE_PER_KIND,
          thresholds_path: Path | None = None, console: Console | None = None, progress: bool = True) -> dict:
    """Held-out check of thresholds: ``per_kind`` validation samples of each built-in kind, never calibrated on.

    Per kind: the share of heads whose error is below theta, the worst heads and the mean density. Written next
    to ``thresholds_path`` (when given) as ``<stem>.check.json``; returns the report.
    """
    from sale_cli.eval.common import atomic_write_json

    _check_args(runner, theta, tokens)
    if per_kind < 1:
        raise UserError(f"--validate must be >= 1, got {per_kind}")
    console = console or Console()
    tau = tau.float().cpu()
    found: dict[str, tuple[list, list, list]] = {kind: ([], [], []) for kind in KINDS}
    count = _counter(runner)
    plan = validation_samples(per_kind, tokens, count)
    with _bar(console, progress) as bar:
        task = bar.add_task("held-out samples", total=len(plan))
        for sample in plan:
            seeds, errs, dens = found[sample.kind]
            err, density = measure(runner, tau, _ids(runner, sample.text))
            seeds.append(sample.seed)
            errs.append(err)
            dens.append(density)
            bar.advance(task)
    report = {
        "model": runner.model_name, "thresholds": str(thresholds_path) if thresholds_path else None, "theta": theta,
        "tokens": tokens, "samples_per_kind": per_kind, "options": runner.options.metadata(),
        "error": "sum over rows and channels of |O_sale - O_dense| / Lq per head, dense output propagated",
        "target": {"heads_below_theta": TARGET_BELOW, "max_error_over_theta": TARGET_WORST},
        "thresholds_mean_tau": tau.mean().item(), "dense_heads": int((tau == 0).sum()),
        "kinds": {kind: _kind_report(tau, theta, *found[kind]) for kind in KINDS},
    }
    if thresholds_path is not None:
        atomic_write_json(check_path(thresholds_path), report)
    return report


def check_table(report: dict, title: str) -> Table:
    """One row per kind: heads below theta, worst error, worst heads, mean density."""
    theta = report["theta"]
    table = Table(title=title)
    for name in ("held-out kind", "samples", "heads < theta", "worst error", "worst heads (layer.head)",
                 "mean density", "target"):
        table.add_column(name, justify="right")
    for kind, r in report["kinds"].items():
        worst = ", ".join(f"{h['layer']}.{h['head']}={h['error']:.2f}" for h in r["worst_heads"][:3])
        table.add_row(kind, str(len(r["seeds"])), f"{100 * r['heads_below_theta']:.1f}%",
                      f"{r['max_error']:.3f} ({r['max_error_over_theta']:.2f}x)", worst, f"{r['mean_density']:.3f}",
                      "met" if r["meets_target"] else "[red]missed[/red]")
    table.caption = (f"theta={theta:g}; target: >= {100 * TARGET_BELOW:g}% of heads below theta, worst error <= "
                     f"{TARGET_WORST:g}x theta")
    return table


def summary_table(tau: torch.Tensor, density: torch.Tensor, title: str) -> Table:
    """Per layer: mean tau, dense heads, expected density (the mean over the calibration samples)."""
    table = Table(title=title)
    for name in ("layer", "mean tau", "dense heads", "expected density"):
        table.add_column(name, justify="right")
    for layer in range(tau.shape[0]):
        row = tau[layer]
        table.add_row(str(layer), f"{row.mean().item():.2e}", f"{int((row == 0).sum())}/{row.numel()}",
                      f"{density[layer].mean().item():.3f}")
    table.add_row("all", f"{tau.mean().item():.2e}", f"{int((tau == 0).sum())}/{tau.numel()}",
                  f"{density.mean().item():.3f}", style="bold")
    return table
