"""The `sale plan` command: placement, prefill chunk and predicted peak memory per GPU, before loading weights."""

from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from sale_cli import demo_model
from sale_cli.commands.common import fail


def plan_table(plan) -> Table:
    """One row per GPU: what it holds and its predicted peak, in GiB."""
    from sale_cli.memory_plan import gib

    chunk = "whole prompt" if plan.chunk == 0 else f"{plan.chunk} tokens"
    where = f"{len(plan.gpus)} GPUs, layers spread" if plan.spread else "one GPU"
    table = Table(title=f"memory plan · {plan.model} · {plan.length} tokens · {plan.method} · prefill chunk {chunk} "
                        f"· {where} · GiB", box=box.SIMPLE_HEAVY, pad_edge=False, collapse_padding=True,
                  caption="act.: the largest transient of one layer on one chunk; need: peak plus headroom")
    table.add_column("GPU", justify="right")
    table.add_column("layers", no_wrap=True)
    table.add_column("also", no_wrap=True)
    for name in ("weights", "KV cache", "act.", "peak", "need", "usable"):
        table.add_column(name, justify="right")
    for g in plan.gpus:
        layers = f"{g.layers.start}-{g.layers.stop - 1} ({len(g.layers)})" if len(g.layers) else "-"
        extra = ", ".join(x for x, on in (("embedding", g.embedding), ("head", g.head)) if on) or "-"
        table.add_row(str(g.index), layers, extra, gib(g.weights), gib(g.kv_cache), gib(g.activations), gib(g.peak),
                      gib(g.need), "-" if g.budget is None else gib(g.budget), style="" if g.fits else "red")
    return table


def plan(
    model: Annotated[str, typer.Argument(help="HF id (in the cache), local directory, .gguf file or the demo alias; "
                                              "only its config is read.")] = demo_model.ALIAS,
    length: Annotated[int | None, typer.Option(help="Prompt plus generation, in tokens. "
                                                    "\\[default: the model's context length]")] = None,
    method: Annotated[str, typer.Option(help="Prefill attention: dense or sale.")] = "sale",
    prefill_chunk: Annotated[int | None, typer.Option(
        help="Tokens per prefill forward (a multiple of 64; 0 = whole prompt). \\[default: the largest that fits]")
    ] = None,
    gpu_memory_gib: Annotated[float | None, typer.Option(
        help="Memory a process may use on each GPU, GiB (e.g. 22 for a 24 GB card). "
             "\\[default: the free memory of each visible GPU]")] = None,
    gpus: Annotated[int | None, typer.Option(help="GPUs to plan for. \\[default: the visible GPUs]")] = None,
    dtype: Annotated[str, typer.Option(help="Model dtype: auto (bfloat16/float16), bfloat16, float16, float32.")
                     ] = "auto",
) -> None:
    """Predict the placement, prefill chunk and peak memory per GPU of a prefill of --length tokens (weights,
    KV cache, activations of one chunk), from the model's config alone. Exits with 1 when it cannot fit."""
    from sale_cli import memory_plan as mp

    if method not in ("dense", "sale"):
        raise typer.BadParameter(f"expected dense or sale, got {method!r}", param_hint="--method")
    if prefill_chunk is not None and (prefill_chunk < 0 or prefill_chunk % mp.CHUNK_MIN):
        raise typer.BadParameter(f"must be 0 (whole prompt) or a positive multiple of {mp.CHUNK_MIN}, got "
                                 f"{prefill_chunk}", param_hint="--prefill-chunk")
    if length is not None and length < 1:
        raise typer.BadParameter(f"must be a positive number of tokens, got {length}", param_hint="--length")
    try:
        b = 2 if dtype == "auto" else mp.dtype_bytes(dtype)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dtype") from exc
    console = Console()
    try:
        budgets = mp.gpu_budgets(gpus, gpu_memory_gib)
        shape = mp.ModelShape.from_config(mp.load_config(model))
    except ValueError as exc:
        raise fail(str(exc)) from exc
    length = length or shape.max_context
    if not length:
        raise fail(f"--length: {model} does not state its context length; pass --length")
    if prefill_chunk and prefill_chunk > length:
        raise typer.BadParameter(f"{prefill_chunk} is longer than --length {length}", param_hint="--prefill-chunk")
    if shape.max_context and length > shape.max_context:
        console.print(f"[yellow]--length {length} exceeds the model's context of {shape.max_context} tokens.[/]")
    name = model.rstrip("/").split("/")[-1]
    result = mp.plan_memory(shape, dtype_bytes=b, length=length, method=method, budgets=budgets,
                            chunk=prefill_chunk, model=name)
    console.print(plan_table(result))
    if not result.fits:
        raise fail(result.reason + ("" if prefill_chunk is None else "; try a smaller --prefill-chunk")
                    + ("; or more GPUs" if len(budgets) == 1 else ""))
    layers = "/".join(str(n) for n in result.layers_per_gpu)
    console.print(f"fits: {'one GPU' if not result.spread else f'layers {layers} over {len(result.gpus)} GPUs'}, "
                  f"prefill chunk {result.chunk or 'whole prompt'}, predicted peak {mp.gib(result.peak)} GiB")
