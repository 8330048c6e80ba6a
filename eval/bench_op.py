"""The attention op alone on Llama-3.1-8B attention shapes (what `sale bench-op` runs and reports).

Rows per (length, data): every SDPA backend; our op at tau = 0 (dense through our path); SALE at fixed taus and
with a thresholds file, int8 and int4 estimates, our CUDA or FlexAttention computation pass, with the
quant / select / compute split from variants that stop after each stage; and the computation pass alone at
coarser selection granularities. Timing follows the device METHOD.md: CUDA events around each call, warm-up,
medians, inputs rotated between two sets.
"""

from __future__ import annotations

import shlex
import statistics
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from sale_cli.data.synthetic_qkv import KINDS, make_inputs
from sale_cli.eval.common import atomic_write_json, software_versions
from sale_cli.kernels import constants

DEFAULT_LENGTHS = (8192, 16384, 32768, 65536, 131072)
DEFAULT_TAUS = (0.001, 0.004, 0.008)
DATA = KINDS
DTYPES = ("bf16", "fp16")
ESTIMATES = ("int8", "int4")
COMPUTES = ("cuda", "flex")
SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
GRANULARITIES = ("64x32", "128x64", "128x128")
BLOCK_Q, BLOCK_K = constants.BLOCK_Q, constants.BLOCK_K  # the selection's blocks; coarser granularities OR-pool them
LOCAL_WINDOW = constants.LOCAL_WINDOW
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


def parse_granularity(name: str) -> tuple[int, int]:
    """'128x64' -> (128, 64): query x key block, multiples of the selection's 64x32 blocks; else ValueError."""
    try:
        bq, bk = (int(x) for x in name.lower().split("x"))
    except ValueError:
        bq = bk = 0
    if bq < BLOCK_Q or bk < BLOCK_K or bq % BLOCK_Q or bk % BLOCK_K:
        raise ValueError(f"{name!r} is not QxK with Q a multiple of {BLOCK_Q} and K a multiple of {BLOCK_K}")
    return bq, bk


# ---------------------------------------------------------------------------------------------- measuring


def measure(call: Callable[[int], Any], warmup: int, reps: int, elapsed_ms: Callable[[Callable], float]) -> list:
    """Times (ms) of `reps` calls after `warmup` untimed ones; call number i gets input set i % INPUT_SETS."""
    for i in range(warmup):
        call(i % INPUT_SETS)
    return [elapsed_ms(lambda i=i: call(i % INPUT_SETS)) for i in range(warmup, warmup + reps)]


def median_ms(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    """Median CUDA-event ms of ``reps`` calls of ``fn`` after ``warmup`` untimed ones (for scripts)."""
    return statistics.median(measure(lambda _i: fn(), warmup, reps, CudaTimer().elapsed_ms))


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
    from sale_cli.kernels.dense import sdpa

    backend = SDPA_BACKENDS[name]

    def on(sets, gqa):
        def call(i):
            q, k, v = sets[i]
            return sdpa(q, k, v, None, backend, enable_gqa=gqa)

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


def bench_case(cfg: BenchConfig, ops: Ops, timer, length: int, data: str,
               on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Every row of one (length, data), finished with TFLOP/s and speedups; on_row(row) as each is measured."""
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
        on_row(rows[-1])
    for setting in cfg.settings:
        tau = torch.tensor(setting.per_head, dtype=torch.float32, device=timer.device)
        sale = _sale_rows(cfg, ops, timer, case, setting, tau, inputs)
        if setting.granularity and cfg.granularities:
            sale += _granularity_rows(cfg, ops, timer, case, setting, tau, inputs, sale)
        for row in sale:
            on_row(row)
        rows += sale
    return finish_rows(rows, flops)


def run_bench(cfg: BenchConfig, ops: Ops, timer, path: Path, payload: dict,
              on_row: Callable[[dict], None] = lambda row: None,
              on_length: Callable[[Table], None] = lambda table: None) -> list[dict]:
    """All lengths and data, the JSON at `path` rewritten (atomically) after each length. on_row(row) as each
    row is measured, on_length(table of the length's rows) as each length is done."""
    rows: list[dict] = []
    for length in cfg.lengths:
        for data in cfg.data:
            rows += bench_case(cfg, ops, timer, length, data, on_row)
            timer.free()
        title = (f"bench-op · {_tokens(length)} tokens · {payload['environment']['device']} · B=1, "
                 f"{cfg.heads} q / {cfg.kv_heads} kv heads, d {cfg.head_dim}, {cfg.dtype}, causal")
        on_length(bench_table([r for r in rows if r["length"] == length], title))
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


def progress_line(r: dict) -> str:
    """One measured row as a line of progress: length, data, variant, then ms and density or the error."""
    what = " ".join(x for x in (r["method"], r["estimate"], r["compute"], r["tau_label"] and f"tau={r['tau_label']}")
                    if x)  # fmt: skip
    result = f"error: {r['error']}" if r["error"] else f"{_fmt(r['ms'], '.2f')} ms, density {_fmt(r['density'], '.3f')}"
    return f"{_tokens(r['length'])} {r['data']} {what}: {result}"


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
