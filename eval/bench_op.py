"""The `sale bench-op` command: the attention op alone on Llama-3.1-8B attention shapes.

Rows per (length, data): every SDPA backend; our op at tau = 0 (dense through our path); SALE at fixed taus and
with a thresholds file, int8 and int4 estimates, our CUDA or FlexAttention computation pass, with the
quant / select / compute split from variants that stop after each stage; and the computation pass alone at
coarser selection granularities. Timing follows the device METHOD.md: CUDA events around each call, warm-up,
medians, inputs rotated between two sets.
"""

from __future__ import annotations

import importlib
import math
import shlex
import statistics
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sale_cli.data.synthetic_qkv import KINDS, make_inputs
from sale_cli.eval.common import atomic_write_json, parse_names, software_versions, split_values

DEFAULT_LENGTHS = (8192, 16384, 32768, 65536, 131072)
DEFAULT_TAUS = (0.001, 0.004, 0.008)
DATA = KINDS
DTYPES = ("bf16", "fp16")
ESTIMATES = ("int8", "int4")
COMPUTES = ("cuda", "flex")
SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
GRANULARITIES = ("64x32", "128x64", "128x128")
BLOCK_Q, BLOCK_K = 64, 32  # the selection's blocks; coarser granularities OR-pool them
LOCAL_WINDOW = 128
INPUT_SETS = 2  # rotated between calls, so that caches do not flatter
ROW_FIELDS = (
    "length", "data", "kind", "method", "backend", "gqa", "estimate", "compute", "tau", "tau_label",
    "granularity", "density", "ms", "ms_runs", "peak_mib", "select_peak_mib", "quant_ms", "select_ms", "compute_ms",
    "note", "error",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------- arithmetic


def causal_flops(length: int, heads: int, head_dim: int, batch: int = 1) -> float:
    """Flops of dense causal attention: two matmuls over the causal triangle, whatever the density."""
    return 4.0 * batch * heads * head_dim * length * (length + 1) / 2


def stage_split(quant_stop_ms: float | None, select_stop_ms: float | None, full_ms: float | None) -> dict:
    """quant / select / compute ms from the op stopped after quant, stopped after select, and the full op."""
    if quant_stop_ms is None or select_stop_ms is None or full_ms is None:
        return {"quant_ms": None, "select_ms": None, "compute_ms": None}
    return {
        "quant_ms": quant_stop_ms,
        "select_ms": select_stop_ms - quant_stop_ms,
        "compute_ms": full_ms - select_stop_ms,
    }


def finish_rows(rows: Sequence[dict], flops: float) -> list[dict]:
    """The rows of one (length, data) with dense-equivalent TFLOP/s, the speedups over the fastest SDPA backend
    ("baseline") and over flash, and quant + select as a % of the fastest SDPA time ("overhead_pct")."""
    sdpa = {r["backend"]: r["ms"] for r in rows if r["kind"] == "sdpa" and r["ms"]}
    baseline = min(sdpa, key=sdpa.get) if sdpa else None
    fastest, flash = sdpa.get(baseline), sdpa.get("flash")
    done = []
    for r in rows:
        ms = r["ms"]
        split = r["quant_ms"] is not None and r["select_ms"] is not None
        done.append({
            **r,
            "baseline": baseline,
            "tflops": flops / ms / 1e9 if ms else None,
            "speedup": fastest / ms if fastest and ms else None,
            "speedup_flash": flash / ms if flash and ms else None,
            "overhead_pct": 100.0 * (r["quant_ms"] + r["select_ms"]) / fastest if split and fastest else None,
        })  # fmt: skip
    return done


def parse_choices(values: list[str] | None, known: Sequence[str], default: Sequence[str], option: str) -> tuple:
    """`parse_names` without 'all', as a BadParameter naming the option."""
    try:
        return tuple(parse_names(values, known, default, option, allow_all=False))
    except ValueError as exc:
        raise typer.BadParameter(str(exc).removeprefix(f"{option}: "), param_hint=option) from exc


def parse_granularity(name: str) -> tuple[int, int]:
    """'128x64' -> (128, 64): query x key block, multiples of the selection's 64x32 blocks."""
    try:
        bq, bk = (int(x) for x in name.lower().split("x"))
    except ValueError:
        bq = bk = 0
    if bq < BLOCK_Q or bk < BLOCK_K or bq % BLOCK_Q or bk % BLOCK_K:
        raise typer.BadParameter(
            f"{name!r} is not QxK with Q a multiple of {BLOCK_Q} and K a multiple of {BLOCK_K}",
            param_hint="--granularities",
        )
    return bq, bk


# ---------------------------------------------------------------------------------------------- measuring


def measure(call: Callable[[int], Any], warmup: int, reps: int, elapsed_ms: Callable[[Callable], float]) -> list:
    """Times (ms) of `reps` calls after `warmup` untimed ones; call number i gets input set i % INPUT_SETS."""
    for i in range(warmup):
        call(i % INPUT_SETS)
    return [elapsed_ms(lambda i=i: call(i % INPUT_SETS)) for i in range(warmup, warmup + reps)]


class CudaTimer:
    """CUDA-event timing, the peak memory of one call, and memory release on the current GPU."""

    device = "cuda"

    def __init__(self):
        self.run_peaks: dict[int, tuple[int, int]] = {}  # GPU -> highest (allocated, reserved) bytes seen

    def elapsed_ms(self, fn: Callable[[], Any]) -> float:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def peak_mib(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """(fn(), MiB allocated at the peak of the call above what was allocated before it)."""
        import torch

        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        peak, gpu = torch.cuda.max_memory_allocated(), torch.cuda.current_device()
        seen = self.run_peaks.get(gpu, (0, 0))
        self.run_peaks[gpu] = (max(seen[0], peak), max(seen[1], torch.cuda.max_memory_reserved()))
        return result, (peak - before) / 2**20

    def memory(self) -> list[dict]:
        """Per GPU used so far: its total and the highest allocated/reserved MiB at the measured calls."""
        import torch

        return [{"gpu": gpu, "name": torch.cuda.get_device_name(gpu),
                 "total_mib": round(torch.cuda.get_device_properties(gpu).total_memory / 2**20, 1),
                 "peak_allocated_mib": round(alloc / 2**20, 1), "peak_reserved_mib": round(reserved / 2**20, 1)}
                for gpu, (alloc, reserved) in sorted(self.run_peaks.items())]

    def free(self) -> None:
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Ops:
    """What is timed: `sale_cli.kernels.cuda_backend` and `sale_cli.kernels.block_sparse` (fakes in tests)."""

    cuda: Any
    block_sparse: Any


@dataclass(frozen=True)
class Setting:
    """One set of SALE thresholds: its label, the fixed tau (None for a file), one tau per query head, the
    estimates to time, and whether the granularity trade-off is measured on its block map."""

    label: str
    tau: float | None
    per_head: tuple[float, ...]
    estimates: tuple[str, ...]
    granularity: bool


@dataclass(frozen=True)
class BenchConfig:
    lengths: tuple[int, ...]
    data: tuple[str, ...]
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    settings: tuple[Setting, ...]
    computes: tuple[str, ...]
    granularities: tuple[str, ...]
    sdpa: tuple[str, ...]
    reps: int
    warmup: int


def make_settings(heads: int, taus: Sequence[float], estimates: Sequence[str],
                  file_tau: Sequence[float] | None = None, file_label: str = "file") -> tuple[Setting, ...]:
    """tau = 0 (dense through our path, first estimate only), each fixed tau, then the file's thresholds."""
    settings = [Setting("0", 0.0, (0.0,) * heads, tuple(estimates[:1]), False)]
    settings += [Setting(f"{t:g}", t, (t,) * heads, tuple(estimates), True) for t in taus]
    if file_tau is not None:
        settings.append(Setting(file_label, None, tuple(file_tau), tuple(estimates), True))
    return tuple(settings)


def _row(base: dict, **fields) -> dict:
    return {**dict.fromkeys(ROW_FIELDS), **base, **fields}


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".strip()


def _attempt(timer, fn: Callable[..., dict], *args) -> dict:
    """fn(*args), or {"error": ...} when it raises (one failed variant, e.g. out of memory, ends nothing)."""
    try:
        return fn(*args)
    except Exception as exc:  # recorded in the row
        error = _error(exc)
    timer.free()  # after the except block, so the traceback's tensors are gone
    return {"error": error}


def _timed(cfg: BenchConfig, timer, call: Callable[[int], Any], summary: Callable[[Any], dict] | None = None):
    """Median ms of the rotated timed calls and the peak memory of one more; summary(its result) adds fields."""
    runs = measure(call, cfg.warmup, cfg.reps, timer.elapsed_ms)
    result, peak = timer.peak_mib(lambda: call(0))
    return {"ms": statistics.median(runs), "ms_runs": runs, "peak_mib": peak, **(summary(result) if summary else {})}


def _sdpa_call(name: str, inputs: list) -> tuple[Callable[[int], Any], str]:
    """One SDPA backend on input set i, and its GQA handling: "native" (enable_gqa), else "repeated" (K/V
    repeated per query head here, outside the timed calls)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[name])

    def on(sets, gqa):
        def call(i):
            q, k, v = sets[i]
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, **({"enable_gqa": True} if gqa else {}))

        return call

    def probe(call):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                call(0)
            except (RuntimeError, TypeError) as exc:  # the warnings say why the backend declined
                reasons = "; ".join(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))
                raise RuntimeError(" ".join(str(exc).split()) + (f" ({reasons})" if reasons else "")) from exc

    native = on(inputs, True)
    groups = inputs[0][0].shape[1] // inputs[0][1].shape[1]
    try:
        probe(native)
        return native, "native"
    except RuntimeError:
        if groups == 1:
            raise
    repeated = on([(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)) for q, k, v in inputs], False)
    probe(repeated)
    return repeated, "repeated"


def _sdpa_row(cfg, timer, case, name, inputs) -> dict:
    def run():
        call, gqa = _sdpa_call(name, inputs)
        return {"gqa": gqa, **_timed(cfg, timer, call)}

    row = _row(case, kind="sdpa", method=f"sdpa {name}", backend=name, density=1.0)
    return {**row, **_attempt(timer, run)}


def _sale_call(ops, inputs, tau, estimate, compute, stop_after=None, need_block_map=False):
    def call(i):
        q, k, v = inputs[i]
        return ops.cuda.sale_attention_cuda(
            q, k, v, tau, scale=None, block_q=BLOCK_Q, block_k=BLOCK_K, sink_tokens=None, local_window=LOCAL_WINDOW,
            estimate=estimate, quant_group="per_token", need_block_map=need_block_map, need_lse=False,
            timing=False, compute=compute, stop_after=stop_after,
        )  # fmt: skip

    return call


def _stage_times(cfg, ops, timer, inputs, tau, estimate) -> dict:
    """Median ms of the op stopped after quant and after select, run with compute="cuda" whatever the rows'
    compute pass: with "flex" the stop after select would include the bitmap -> bool map conversion, which
    belongs to FlexAttention's computation pass. Also the peak memory of the op stopped after select
    ("select_peak_mib": the selection's workspace and its bitmap)."""
    calls = {stop: _sale_call(ops, inputs, tau, estimate, "cuda", stop_after=stop) for stop in ("quant", "select")}
    times = {stop: statistics.median(measure(call, cfg.warmup, cfg.reps, timer.elapsed_ms))
             for stop, call in calls.items()}  # fmt: skip
    return {**times, "select_peak_mib": timer.peak_mib(lambda: calls["select"](0))[1]}


def _full_op(cfg, ops, timer, inputs, tau, estimate, compute) -> dict:
    call = _sale_call(ops, inputs, tau, estimate, compute)
    return _timed(cfg, timer, call, lambda result: {"density": float(result[3].mean())})


def _sale_rows(cfg, ops, timer, case, setting, tau, inputs) -> list[dict]:
    """Per estimate: the stage variants once, then the full op with each compute pass."""
    rows = []
    for estimate in setting.estimates:
        stops = _attempt(timer, _stage_times, cfg, ops, timer, inputs, tau, estimate)
        for compute in cfg.computes:
            row = _row(case, kind="sale", method="sale", estimate=estimate, compute=compute, tau=setting.tau,
                       tau_label=setting.label)
            row.update(_attempt(timer, _full_op, cfg, ops, timer, inputs, tau, estimate, compute))
            row.update(stage_split(stops.get("quant"), stops.get("select"), row["ms"]))
            row["select_peak_mib"] = stops.get("select_peak_mib")
            if "error" in stops:
                row["note"] = f"no stage split: {stops['error']}"
            rows.append(row)
    return rows


def _block_maps(ops, inputs, tau, estimate) -> dict:
    """The 64x32 block map of each input set (the op stopped after select)."""
    call = _sale_call(ops, inputs, tau, estimate, "cuda", stop_after="select", need_block_map=True)
    return {"maps": [call(i)[2] for i in range(INPUT_SETS)]}


def _flex_on_map(cfg, ops, timer, inputs, maps, bq, bk) -> dict:
    """FlexAttention on the 64x32 maps OR-pooled to bq x bk blocks: density at that granularity and time."""
    bs = ops.block_sparse
    coarse = [bs.coarsen_block_map(m, bq // BLOCK_Q, bk // BLOCK_K) for m in maps]
    density = float(bs.map_density(coarse[0], inputs[0][0].shape[2], bq, bk).mean())

    def call(i):
        q, k, v = inputs[i]
        return bs.flex_block_sparse_attention(q, k, v, coarse[i], block_q=bq, block_k=bk, scale=None)

    return {"density": density, **_timed(cfg, timer, call)}


def _granularity_rows(cfg, ops, timer, case, setting, tau, inputs, sale_rows) -> list[dict]:
    """The computation pass alone on the int8 selection's block map at each granularity; at 64x32 also our
    CUDA compute (the compute split of the full op)."""
    estimate = "int8" if "int8" in setting.estimates else setting.estimates[0]
    base = _row(case, kind="granularity", estimate=estimate, compute="flex", tau=setting.tau,
                tau_label=setting.label)
    got = _attempt(timer, _block_maps, ops, inputs, tau, estimate)
    if "error" in got:
        return [{**base, "method": "compute", "error": got["error"]}]
    cuda = [r for r in sale_rows if r["estimate"] == estimate and r["compute"] == "cuda" and r["compute_ms"]]
    rows = []
    for name in cfg.granularities:
        bq, bk = parse_granularity(name)
        rows.append({**base, "method": f"compute {name}", "granularity": name,
                     **_attempt(timer, _flex_on_map, cfg, ops, timer, inputs, got["maps"], bq, bk)})
        if (bq, bk) == (BLOCK_Q, BLOCK_K) and cuda:
            rows.append({**base, "method": f"compute {name}", "granularity": name, "compute": "cuda",
                         "density": cuda[0]["density"], "ms": cuda[0]["compute_ms"],
                         "note": "compute split of the full op"})
    return rows


def bench_case(cfg: BenchConfig, ops: Ops, timer, length: int, data: str, console: Console) -> list[dict]:
    """Every row of one (length, data), finished with TFLOP/s and speedups."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]
    case = {"length": length, "data": data}
    flops = causal_flops(length, cfg.heads, cfg.head_dim)
    try:
        inputs = [make_inputs(data, length, cfg.heads, cfg.kv_heads, cfg.head_dim, dtype, seed=length + s,
                              device=timer.device) for s in range(INPUT_SETS)]  # fmt: skip
    except Exception as exc:  # e.g. out of memory at the longest lengths: recorded
        return finish_rows([_row(case, kind="inputs", method="inputs", error=_error(exc))], flops)
    rows = []
    for name in cfg.sdpa:
        rows.append(_sdpa_row(cfg, timer, case, name, inputs))
        _progress(console, rows[-1])
    for setting in cfg.settings:
        tau = torch.tensor(setting.per_head, dtype=torch.float32, device=timer.device)
        sale = _sale_rows(cfg, ops, timer, case, setting, tau, inputs)
        if setting.granularity and cfg.granularities:
            sale += _granularity_rows(cfg, ops, timer, case, setting, tau, inputs, sale)
        for row in sale:
            _progress(console, row)
        rows += sale
    return finish_rows(rows, flops)


def run_bench(cfg: BenchConfig, ops: Ops, timer, console: Console, path: Path, payload: dict) -> list[dict]:
    """All lengths and data: a table per length, and the JSON at `path` rewritten (atomically) after each."""
    rows: list[dict] = []
    for length in cfg.lengths:
        for data in cfg.data:
            rows += bench_case(cfg, ops, timer, length, data, console)
            timer.free()
        title = (f"bench-op · {_tokens(length)} tokens · {payload['environment']['device']} · B=1, "
                 f"{cfg.heads} q / {cfg.kv_heads} kv heads, d {cfg.head_dim}, {cfg.dtype}, causal")
        console.print(bench_table([r for r in rows if r["length"] == length], title))
        memory = {"memory": timer.memory()} if hasattr(timer, "memory") else {}  # peak per GPU, whole run
        atomic_write_json(path, {**payload, "rows": rows, **memory})
    return rows


# ---------------------------------------------------------------------------------------------- output


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _split_cell(r: dict) -> str:
    if r["quant_ms"] is None:
        return "-" if r["compute_ms"] is None else f"- / - / {r['compute_ms']:.2f}"
    return f"{r['quant_ms']:.2f} / {r['select_ms']:.2f} / {r['compute_ms']:.2f}"


def _note(r: dict) -> str:
    if r["error"]:
        return f"error: {r['error']}"
    return "; ".join(n for n in (r["note"], "K/V repeated" if r["gqa"] == "repeated" else None) if n)


def _cells(r: dict) -> list[str]:
    return [
        r["data"], r["method"], r["estimate"] or "-", r["compute"] or "-", r["tau_label"] or "-",
        _fmt(r["density"], ".3f"), "error" if r["error"] else _fmt(r["ms"], ".2f"), _fmt(r["tflops"], ".1f"),
        _fmt(r["speedup"], ".2f", "x"), _fmt(r["speedup_flash"], ".2f", "x"), _split_cell(r),
        _fmt(r["overhead_pct"], ".1f"), _fmt(r["peak_mib"], ".0f"), _fmt(r["select_peak_mib"], ".0f"),
    ]  # fmt: skip


HEADERS = ("data", "method", "estimate", "compute", "tau", "density", "ms", "TFLOP/s\n(dense-eq)",
           "speedup vs\nfastest SDPA", "vs\nflash", "quant / select /\ncompute ms", "q+s %\nof SDPA",
           "peak\nMiB", "select\npeak MiB")  # fmt: skip


def bench_table(rows: Sequence[dict], title: str) -> Table:
    """Rich table of the rows (one length); errors and notes in the last column."""
    table = Table(title=title, box=box.SIMPLE_HEAVY, pad_edge=False, collapse_padding=True)
    for i, name in enumerate(HEADERS):
        table.add_column(name, justify="left" if i < 5 else "right")
    table.add_column("note")
    for r in rows:
        table.add_row(*_cells(r), Text(_note(r)[:100], style="red" if r["error"] else "dim"))
    return table


def markdown_table(rows: Sequence[dict]) -> str:
    """All rows as one Markdown table (for docs/BENCHMARKS.md)."""
    headers = ["L", *(h.replace("\n", " ") for h in HEADERS), "note"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        note = _note(r)[:120].replace("|", "/")
        lines.append("| " + " | ".join([_tokens(r["length"]), *_cells(r), note]) + " |")
    return "\n".join(lines)


def _progress(console: Console, r: dict) -> None:
    what = " ".join(x for x in (r["method"], r["estimate"], r["compute"], r["tau_label"] and f"tau={r['tau_label']}")
                    if x)  # fmt: skip
    result = f"error: {r['error']}" if r["error"] else f"{_fmt(r['ms'], '.2f')} ms, density {_fmt(r['density'], '.3f')}"
    console.print(f"{_tokens(r['length'])} {r['data']} {what}: {result}", style="dim", markup=False, highlight=False)


def environment(ops: Ops) -> dict[str, Any]:
    """Device, software versions, date and command line of this run."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    major, minor = torch.cuda.get_device_capability()
    return {
        "device": torch.cuda.get_device_name(),
        "capability": f"{major}.{minor}",
        **software_versions(),
        "triton": triton_version,
        "default_compute": ops.cuda.default_compute(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
    }


# ---------------------------------------------------------------------------------------------- command


def _file_thresholds(path: Path, layer: int | None, heads: int) -> tuple[list[float], int, dict[str, str]]:
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


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


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
        parse_granularity(name)
    if layer is not None and thresholds is None:
        raise typer.BadParameter("--layer needs --thresholds", param_hint="--layer")
    file_tau, file_layer, file_meta = (None, None, {})
    if thresholds is not None:
        file_tau, file_layer, file_meta = _file_thresholds(thresholds, layer, heads)

    import torch

    if not torch.cuda.is_available():
        _fail(f"bench-op needs a CUDA GPU; none is visible (torch {torch.__version__}, CUDA build {torch.version.cuda})")
    from sale_cli.kernels import cuda_backend

    ok, why = cuda_backend.available()
    if not ok:
        _fail(f"the SALE CUDA backend is unavailable: {why}")
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
    rows = run_bench(cfg, ops, CudaTimer(), console, path, {"environment": environment(ops), "config": config})
    typer.echo(markdown_table(rows))
    console.print(f"Wrote {path}")
