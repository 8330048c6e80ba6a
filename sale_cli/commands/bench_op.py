"""The `sale bench-op` command: options, checks and output around `sale_cli.eval.bench_op`."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sale_cli.commands.common import fail, parse_choices, split_values
from sale_cli.eval.bench_op import (
    BLOCK_K,
    BLOCK_Q,
    COMPUTES,
    DATA,
    DEFAULT_LENGTHS,
    DEFAULT_TAUS,
    DTYPES,
    ESTIMATES,
    GRANULARITIES,
    INPUT_SETS,
    LOCAL_WINDOW,
    SDPA_BACKENDS,
    BenchConfig,
    CudaTimer,
    Ops,
    environment,
    make_settings,
    markdown_table,
    parse_granularity,
    progress_line,
    run_bench,
)


def file_thresholds(path: Path, layer: int | None, heads: int) -> tuple[list[float], int, dict[str, str]]:
    """(taus of one layer, the layer, the file's metadata); BadParameter when the file does not fit."""
    from sale_cli import thresholds as thresholds_file

    try:
        tau, meta = thresholds_file.load(path)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--thresholds") from exc
    num_layers, file_heads = tau.shape
    if file_heads != heads:
        raise typer.BadParameter(
            f"{path} holds thresholds for {file_heads} query heads per layer, but --heads is {heads}",
            param_hint="--thresholds",
        )
    layer = num_layers // 2 if layer is None else layer
    if not 0 <= layer < num_layers:
        raise typer.BadParameter(f"{path} has layers 0-{num_layers - 1}, got {layer}", param_hint="--layer")
    return tau[layer].tolist(), layer, meta


def bench_op(
    lengths: Annotated[list[str] | None, typer.Option(
        help="Sequence lengths in tokens (comma/space-separated or repeated).",
        show_default="8192,16384,32768,65536,131072")] = None,
    heads: Annotated[int, typer.Option(help="Query heads.")] = 32,
    kv_heads: Annotated[int, typer.Option(help="Key/value heads (GQA; --heads must be a multiple).")] = 8,
    head_dim: Annotated[int, typer.Option(help="Head dimension.")] = 128,
    dtype: Annotated[str, typer.Option(help="Input dtype: bf16 or fp16.")] = "bf16",
    data: Annotated[list[str] | None, typer.Option(
        help="Synthetic inputs (comma-separated or repeated): structured (LLM-like peaked attention: a sink, heavy "
             "keys, local bias; density ~0.2 at tau 0.004) and/or random (N(0, 1), flat attention, density ~1).",
        show_default="structured")] = None,
    taus: Annotated[list[str] | None, typer.Option(
        help="Fixed thresholds for every head, each > 0 (tau = 0, dense through our path, is always timed).",
        show_default="0.001,0.004,0.008")] = None,
    thresholds: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False,
        help="Calibrated thresholds .safetensors file: also time SALE with its thresholds of --layer "
             "(its head count must equal --heads).")] = None,
    layer: Annotated[int | None, typer.Option(
        help="Layer of --thresholds to use.", show_default="the middle layer")] = None,
    estimates: Annotated[list[str] | None, typer.Option(
        help="Estimate precisions, side by side: int8, int4.", show_default="int8,int4")] = None,
    computes: Annotated[list[str] | None, typer.Option(
        help="Computation passes: cuda (our block-sparse kernel), flex (FlexAttention on the same block list).",
        show_default="cuda,flex")] = None,
    granularities: Annotated[list[str] | None, typer.Option(
        help="Selection granularities QxK (Q a multiple of 64, K of 32) for the computation-pass trade-off: "
             "FlexAttention alone on the int8 block map OR-pooled to QxK blocks; 'none' skips it.",
        show_default="64x32,128x64,128x128")] = None,
    sdpa: Annotated[list[str] | None, typer.Option(
        help="SDPA backends to time: cudnn, flash, efficient; the fastest is the speedup baseline.",
        show_default="all three")] = None,
    reps: Annotated[int, typer.Option(help="Timed calls per variant; the median is reported.")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed calls per variant before the timed ones.")] = 2,
    results_dir: Annotated[Path, typer.Option(
        help="Results root; writes RESULTS_DIR/EXP/bench_op.json.")] = Path("results"),
    exp: Annotated[str, typer.Option(help="Experiment name.")] = "bench_op",
    out: Annotated[Path | None, typer.Option(
        dir_okay=False, help="Write the JSON here instead of RESULTS_DIR/EXP/bench_op.json.")] = None,
) -> None:
    """Time the attention op alone on Llama-3.1-8B attention shapes (B=1, causal).

    Per length and data: every SDPA backend (cuDNN, flash, efficient), our op
    at tau = 0 (dense through our path), and SALE at each --taus and with
    --thresholds, per estimate and computation pass.

    Reports ms, dense-equivalent TFLOP/s, density, speedup over the fastest
    SDPA backend and over flash, the quant / select / compute split (from
    variants that stop after each stage), quant + select as % of the fastest
    SDPA time, peak memory (of the whole op, and of the op stopped after
    selection: the selection's workspace and bitmap), and the computation
    pass alone at coarser selection granularities.

    Timing: CUDA events, --warmup untimed then --reps timed calls (median),
    two input sets rotated. Writes RESULTS_DIR/EXP/bench_op.json after each
    length; ends with a Markdown table of every row. Needs a CUDA GPU.
    """
    length_list = tuple(dict.fromkeys(split_values(lengths, int, "--lengths") or DEFAULT_LENGTHS))
    if min(length_list) < 1:
        raise typer.BadParameter(f"lengths must be positive, got {min(length_list)}", param_hint="--lengths")
    for value, option, low in ((heads, "--heads", 1), (kv_heads, "--kv-heads", 1), (head_dim, "--head-dim", 1),
                               (reps, "--reps", 1), (warmup, "--warmup", 0)):  # fmt: skip
        if value < low:
            raise typer.BadParameter(f"must be at least {low}, got {value}", param_hint=option)
    if heads % kv_heads:
        raise typer.BadParameter(f"{heads} is not a multiple of --kv-heads {kv_heads}", param_hint="--heads")
    if dtype not in DTYPES:
        raise typer.BadParameter(f"expected one of {', '.join(DTYPES)}, got {dtype!r}", param_hint="--dtype")
    data_list = parse_choices(data, DATA, ("structured",), "--data")
    tau_list = tuple(dict.fromkeys(split_values(taus, float, "--taus") or DEFAULT_TAUS))
    if not all(0.0 < t < math.inf for t in tau_list):
        raise typer.BadParameter(f"each tau must be > 0 and finite, got {list(tau_list)}", param_hint="--taus")
    estimate_list = parse_choices(estimates, ESTIMATES, ESTIMATES, "--estimates")
    compute_list = parse_choices(computes, COMPUTES, COMPUTES, "--computes")
    sdpa_list = parse_choices(sdpa, tuple(SDPA_BACKENDS), tuple(SDPA_BACKENDS), "--sdpa")
    names = split_values(granularities, str, "--granularities") or list(GRANULARITIES)
    granularity_list = () if names == ["none"] else tuple(dict.fromkeys(names))
    for name in granularity_list:
        try:
            parse_granularity(name)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--granularities") from exc
    if layer is not None and thresholds is None:
        raise typer.BadParameter("--layer needs --thresholds", param_hint="--layer")
    file_tau, file_layer, file_meta = (None, None, {})
    if thresholds is not None:
        file_tau, file_layer, file_meta = file_thresholds(thresholds, layer, heads)

    import torch

    if not torch.cuda.is_available():
        raise fail(f"bench-op needs a CUDA GPU; none is visible (torch {torch.__version__}, CUDA build {torch.version.cuda})")
    from sale_cli.kernels import cuda_backend

    ok, why = cuda_backend.available()
    if not ok:
        raise fail(f"the SALE CUDA backend is unavailable: {why}")
    ops = Ops(cuda_backend, importlib.import_module("sale_cli.kernels.block_sparse") if granularity_list else None)

    cfg = BenchConfig(
        lengths=length_list, data=data_list, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
        settings=make_settings(heads, tau_list, estimate_list, file_tau, f"file L{file_layer}"),
        computes=compute_list, granularities=granularity_list, sdpa=sdpa_list, reps=reps, warmup=warmup,
    )  # fmt: skip
    config = {
        "lengths": list(length_list), "data": list(data_list), "batch": 1, "heads": heads, "kv_heads": kv_heads,
        "head_dim": head_dim, "dtype": dtype, "causal": True, "taus": list(tau_list),
        "thresholds": str(thresholds) if thresholds else None, "layer": file_layer,
        "thresholds_metadata": file_meta, "estimates": list(estimate_list), "computes": list(compute_list),
        "granularities": list(granularity_list), "sdpa": list(sdpa_list), "reps": reps, "warmup": warmup,
        "input_sets": INPUT_SETS, "block_q": BLOCK_Q, "block_k": BLOCK_K, "local_window": LOCAL_WINDOW,
        "quant_group": "per_token",
    }  # fmt: skip
    path = out or results_dir / exp / "bench_op.json"
    console = Console(width=None if sys.stdout.isatty() else 200)

    def on_row(row: dict) -> None:
        console.print(progress_line(row), style="dim", markup=False, highlight=False)

    rows = run_bench(cfg, ops, CudaTimer(), path, {"environment": environment(ops), "config": config},
                     on_row=on_row, on_length=console.print)
    typer.echo(markdown_table(rows))
    console.print(f"Wrote {path}")
