"""Per-head threshold calibration (docs/SPEC.md, section 10).

One dense forward per sample; at every layer the hook compares each head's SALE output with the dense one
(the dense output goes on to the next layer, so errors do not compound) and halves tau while the error is
>= theta. Tau carries over between samples. With the runner's prefill chunk, each chunk's attention call is
one comparison (tau carries over between chunks as between samples); the file records the chunk. Progress
is saved after every sample, so an interrupted run resumes without redoing finished samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sale_cli import thresholds as thresholds_io
from sale_cli.data.calibration import kv_retrieval_sample
from sale_cli.errors import UserError
from sale_cli.kernels import sale_attention
from sale_cli.runner import Runner

TAU0 = 0.008
DEFAULT_THETA = 0.4  # the paper's theta for Llama-3.1-8B; `sale calibrate` and `sale latency` default to it
FLOOR = 1e-4
PAPER_SAMPLES, PAPER_TOKENS = 5, 120_000
DEMO_SAMPLES, DEMO_TOKENS = 2, 2048
MIN_TOKENS = 64  # the smallest calibration sample (sale_cli.data.calibration)


@dataclass
class LayerSearch:
    """Halving search over one layer's heads on one sample; remembers the accepted density per head."""

    theta: float
    floor: float = FLOOR

    def run(self, tau: torch.Tensor, q, k, v, dense_out, scale, op_kwargs) -> torch.Tensor:
        """Update ``tau`` [Hq] (CPU, in place); return the density of each head at its accepted tau."""
        Hq, Hkv = q.shape[1], k.shape[1]
        G = Hq // Hkv
        density = torch.ones(Hq)
        active = tau > 0
        dense_out = dense_out.float()
        while active.any():
            groups = active.view(Hkv, G).any(dim=1)  # only kv groups with a head still searching
            heads = groups.repeat_interleave(G)
            res = sale_attention(q[:, heads], k[:, groups], v[:, groups], tau[heads].to(q.device), scale=scale,
                                 **op_kwargs, return_density=True)
            err = torch.zeros(Hq)
            err[heads] = ((res.out.float() - dense_out[:, heads]).abs().sum(dim=(2, 3)).mean(0) / q.shape[2]).cpu()
            density[heads] = res.density.mean(0).cpu()
            failing = active & (err >= self.theta)
            tau[failing] /= 2
            tau[failing & (tau <= self.floor)] = 0.0
            density[tau == 0] = 1.0
            active = failing & (tau > 0)
        return density


def _partial_path(out: Path) -> Path:
    return out.with_name(out.stem + ".partial.safetensors")


def calibrate(runner: Runner, theta: float, *, samples: int, tokens: int, out: Path, tau0: float = TAU0,
              console: Console | None = None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrate thresholds for ``runner``'s model; returns (thresholds [L, H], density [L, H] on the last sample).

    Writes ``out`` at the end; ``<out>.partial.safetensors`` holds finished samples while running.
    """
    if not (math.isfinite(theta) and theta > 0):
        raise ValueError(f"theta must be a finite number > 0, got {theta}")
    if not (math.isfinite(tau0) and tau0 >= 0):
        raise ValueError(f"tau0 must be a finite number >= 0, got {tau0}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if runner.max_context and tokens > runner.max_context:
        raise ValueError(f"tokens ({tokens}) exceeds the model's context limit ({runner.max_context})")
    console = console or Console()
    meta = dict(model=runner.model_name, theta=theta, tau0=tau0, tokens=tokens, options=runner.options,
                prefill_chunk=runner.prefill_chunk)
    tau = torch.full((runner.num_layers, runner.num_heads), tau0, dtype=torch.float32)
    density = torch.ones_like(tau)
    done = 0
    partial = _partial_path(out)
    if partial.is_file():
        try:
            tau, saved = thresholds_io.load(partial, num_layers=runner.num_layers, num_heads=runner.num_heads,
                                            options=runner.options, model=runner.model_name)
            same = saved.get("theta") == f"{theta:g}" and saved.get("tau0") == f"{tau0:g}" and \
                saved.get("tokens") == str(tokens) and saved.get("prefill_chunk") == str(runner.prefill_chunk)
            done = int(saved["samples"]) if same else 0
        except (ValueError, KeyError) as exc:
            raise UserError(f"{exc} ({partial} holds an interrupted calibration: delete it to start afresh)") from exc
        if same:
            console.print(f"Resuming from {partial}: {done} of {samples} samples done.")
        else:
            tau = torch.full_like(tau, tau0)
    search = LayerSearch(theta)
    op_kwargs = runner.options.op_kwargs()
    tok = runner.tokenizer

    def count(text: str) -> int:
        return len(tok(runner.apply_chat_template(text), add_special_tokens=False).input_ids)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress) as bar:
        sample_task = bar.add_task("samples", total=samples, completed=done)
        layer_task = bar.add_task("layers", total=runner.num_layers)

        def hook(layer, q, k, v, dense_out, scale):
            density[layer] = search.run(tau[layer], q, k, v, dense_out, scale, op_kwargs)
            bar.advance(layer_task)

        for index in range(done, samples):
            prompt, _ = kv_retrieval_sample(index, tokens, count)
            ids = tok(runner.apply_chat_template(prompt), add_special_tokens=False).input_ids
            calls = runner.num_layers * len(runner.chunk_bounds(len(ids)))  # the hook runs per layer and chunk
            bar.reset(layer_task, total=calls, description=f"layers (sample {index + 1}, {len(ids)} tokens)")
            runner.set_method("dense")
            runner.state.hook = hook
            try:
                runner.prefill(ids)
            finally:
                runner.state.hook = None
            thresholds_io.save(partial, tau, samples=index + 1, **meta)
            bar.advance(sample_task)
    thresholds_io.save(out, tau, samples=samples, **meta)
    partial.unlink(missing_ok=True)
    return tau, density


def summary_table(tau: torch.Tensor, density: torch.Tensor, title: str) -> Table:
    """Per layer: mean tau, dense heads, expected density (measured on the last calibration sample)."""
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
