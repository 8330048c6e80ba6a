"""`sale summarize`: what the experiments under a results folder hold, side by side.

Three kinds of results, each in its own table: LongBench/InfiniteBench scores with attention time and density
(also summary.csv and a plot), `sale latency` runs (latency.json: dense vs SALE per length) and the demo's
passkey retrieval (demo/passkey.json). A folder or file it cannot use is skipped with a one-line note.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sale_cli.errors import UserError
from sale_cli.eval import infinitebench, longbench
from sale_cli.eval.common import Benchmark, atomic_write_text, mean_or_none, read_json

BENCHES: list[Benchmark] = [longbench.BENCH, infinitebench.BENCH]
ATTN_ROW, DENSITY_ROW = "attention ms (mean)", "density (mean)"
LATENCY_FILE = "latency.json"
DEMO_FILE = "passkey.json"
# Attention time (what SALE changes) per method; speedup = dense / SALE attention time.
LATENCY_HEADER = ["experiment", "device", "length", "dense ms", "SALE ms", "speedup", "density"]
DEMO_HEADER = ["experiment", "method", "backend", "accuracy", "density", "prefill s", "attn s"]
# The errors a damaged or foreign file raises while read or scored (json's errors are ValueErrors).
_UNUSABLE = (UserError, OSError, ValueError, KeyError, TypeError, AttributeError, ModuleNotFoundError)


@dataclass
class Collected:
    """Everything usable under a results folder, and a note for each thing skipped."""

    benches: dict[str, dict[str, dict]] = field(default_factory=dict)  # {exp: {bench: {scores, attn_ms, density}}}
    latency: list[list[str]] = field(default_factory=list)  # LATENCY_HEADER rows
    demo: list[list[str]] = field(default_factory=list)  # DEMO_HEADER rows
    demo_devices: dict[str, str] = field(default_factory=dict)  # {exp: where the demo ran}
    skipped: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.benches or self.latency or self.demo)


def _why(err: BaseException) -> str:
    if isinstance(err, ModuleNotFoundError):
        return f"scoring needs {err.name} (pip install 'sale[eval]')"
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _scores(bench: Benchmark, exp_dir: Path, skipped: list[str]) -> dict[str, float]:
    """result.json when it is newer than every prediction file and readable, else a fresh (unwritten) scoring."""
    result = exp_dir / bench.name / "result.json"
    files = list((exp_dir / bench.name).glob("*.jsonl"))
    if result.exists() and all(f.stat().st_mtime <= result.stat().st_mtime for f in files):
        try:
            return bench.read_result(exp_dir)
        except _UNUSABLE as err:
            skipped.append(f"{result}: unreadable ({_why(err)}); scored again from the predictions")
    return bench.score(exp_dir, write=False)


def _bench_results(exp_dir: Path, skipped: list[str]) -> dict[str, dict]:
    out = {}
    for bench in BENCHES:
        if not (exp_dir / bench.name).is_dir():
            continue
        try:
            names = bench.available(exp_dir)
            if not names:
                skipped.append(f"{exp_dir / bench.name}: no predictions (a failed or unfinished run)")
                continue
            records = [r for n in names for r in bench.predictions(exp_dir, n).records()]
            out[bench.name] = {
                "scores": _scores(bench, exp_dir, skipped),
                "attn_ms": mean_or_none([r.get("attn_ms") for r in records]),
                "density": mean_or_none([r.get("density") for r in records]),
            }
        except _UNUSABLE as err:
            skipped.append(f"{exp_dir / bench.name}: unusable ({_why(err)})")
    return out


def _num(value: Any, spec: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return ""
    return format(value, spec)


def latency_rows(exp: str, payload: Any) -> list[list[str]]:
    """LATENCY_HEADER rows of one latency.json (the `sale latency` output): one row per length."""
    records = payload["records"]
    device = str(payload.get("environment", {}).get("device", ""))
    by_length: dict[int, dict[str, dict]] = {}
    for r in records:
        by_length.setdefault(int(r["length"]), {})[str(r["method"])] = r
    rows = []
    for length, methods in sorted(by_length.items()):
        dense, sale = methods.get("dense", {}), methods.get("sale", {})
        rows.append([exp, device, str(length), _num(dense.get("attn_ms"), ".1f"), _num(sale.get("attn_ms"), ".1f"),
                     _num(sale.get("attn_speedup"), ".2f"), _num(sale.get("density"), ".3f")])
    if not rows:
        raise ValueError("no records")
    return rows


def demo_rows(exp: str, payload: Any) -> list[list[str]]:
    """DEMO_HEADER rows of the demo's passkey.json: one row per method."""
    records = payload["records"]
    rows = []
    for method in dict.fromkeys(str(r["method"]) for r in records):
        mine = [r for r in records if r["method"] == method]
        backend = payload.get("dense_backend" if method == "dense" else "sale_backend", "")
        rows.append([exp, method, str(backend or ""),
                     f"{sum(bool(r['correct']) for r in mine)}/{len(mine)}",
                     _num(mean_or_none([r.get("density") for r in mine]), ".3f"),
                     _num(mean_or_none([r["prefill_ms"] / 1000 for r in mine]), ".2f"),
                     _num(mean_or_none([r["attn_ms"] / 1000 for r in mine]), ".2f")])
    if not rows:
        raise ValueError("no records")
    return rows


def _file_rows(path: Path, exp: str, parse, skipped: list[str]) -> list[list[str]]:
    try:
        return parse(exp, read_json(path))
    except _UNUSABLE as err:
        skipped.append(f"{path}: unusable ({_why(err)})")
        return []


def _known(exp_dir: Path) -> bool:
    """Whether the folder holds any kind of result this command reads."""
    return any((exp_dir / b.name).is_dir() for b in BENCHES) or (exp_dir / LATENCY_FILE).is_file() or \
        (exp_dir / DEMO_FILE).is_file()


def collect(results_dir: Path, exps: list[str] | None) -> Collected:
    """The usable results of `exps` (default: every folder under `results_dir` holding results)."""
    found = Collected()
    if exps is None:
        exps = sorted(p.name for p in results_dir.iterdir() if p.is_dir() and _known(p)) \
            if results_dir.is_dir() else []
    for exp in exps:
        exp_dir = results_dir / exp
        if not _known(exp_dir):
            found.skipped.append(f"{exp_dir}: no benchmark, latency or demo results")
            continue
        benches = _bench_results(exp_dir, found.skipped)
        if benches:
            found.benches[exp] = benches
        if (exp_dir / LATENCY_FILE).is_file():
            found.latency += _file_rows(exp_dir / LATENCY_FILE, exp, latency_rows, found.skipped)
        if (exp_dir / DEMO_FILE).is_file():
            demo = _file_rows(exp_dir / DEMO_FILE, exp, demo_rows, found.skipped)
            if demo:
                found.demo += demo
                found.demo_devices[exp] = str(read_json(exp_dir / DEMO_FILE).get("device") or "?")
    return found


def rows(data: dict[str, dict[str, dict]]) -> list[list[str]]:
    """Benchmark table rows [benchmark, row name, one cell per experiment]."""
    exps = list(data)
    out: list[list[str]] = []
    for bench in BENCHES:
        runs = [data[e].get(bench.name) for e in exps]
        if not any(runs):
            continue
        names = [n for n in [*bench.names, "average"] if any(r and n in r["scores"] for r in runs)]
        for name in names:
            out.append([bench.name, name, *(f"{r['scores'][name]:.2f}" if r and name in r["scores"] else ""
                                            for r in runs)])
        for label, key, fmt in ((ATTN_ROW, "attn_ms", "{:.1f}"), (DENSITY_ROW, "density", "{:.3f}")):
            out.append([bench.name, label, *(fmt.format(r[key]) if r and r[key] is not None else ""
                                             for r in runs)])
    return out


def _plot(data: dict[str, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for bench, marker in zip(BENCHES, "os", strict=True):
        points = [(e, d[bench.name]) for e, d in data.items() if bench.name in d and d[bench.name]["attn_ms"]]
        if not points:
            continue
        xs = [r["attn_ms"] for _, r in points]
        ys = [r["scores"]["average"] for _, r in points]
        ax.scatter(xs, ys, marker=marker, label=bench.name)
        for (exp, _), x, y in zip(points, xs, ys, strict=True):
            ax.annotate(exp, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("mean attention time of the prefill per sample (ms)")
    ax.set_ylabel("average score")
    ax.set_title("Accuracy against attention time")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def _markdown(header: list[str], body: list[list[str]], left: int) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * left + ["---:"] * (len(header) - left)) + "|"]
    return lines + ["| " + " | ".join(cell or "—" for cell in row) + " |" for row in body]


def _csv(header: list[str], body: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *body])
    return buf.getvalue()


@dataclass
class TableData:
    """One table to show: its title, header, rows and how many leading columns are text (the rest numbers)."""

    title: str
    header: list[str]
    body: list[list[str]]
    left: int


@dataclass
class Summary:
    """What `summarize` wrote: the tables to show (in order) and the files written."""

    tables: list[TableData]
    written: list[Path]


def summarize(results_dir: Path, found: Collected, exps: list[str] | None = None) -> Summary:
    """Write summary.md (every table), summary.csv and summary.png (benchmarks) and summary_latency.csv into
    `results_dir` from what `collect` found; FileNotFoundError naming --results-dir when it found nothing."""
    if found.empty():
        raise FileNotFoundError(f"--results-dir: no usable benchmark, latency or demo results under {results_dir}"
                                + (f" for --exp {', '.join(exps)}" if exps else ""))
    tables: list[TableData] = []
    md: list[str] = []
    written: list[Path] = []
    if found.benches:
        header = ["benchmark", "dataset", *found.benches]
        body = rows(found.benches)
        tables.append(TableData(f"SALE evaluation ({results_dir})", header, body, 2))
        md += _markdown(header, body, 2)
        atomic_write_text(results_dir / "summary.csv", _csv(header, body))
        _plot(found.benches, results_dir / "summary.png")
        written += [results_dir / "summary.csv", results_dir / "summary.png"]
    if found.latency:
        tables.append(TableData("Prefill latency (sale latency): attention ms, medians", LATENCY_HEADER,
                                found.latency, 2))
        md += ([""] if md else []) + ["## Prefill latency", "", *_markdown(LATENCY_HEADER, found.latency, 2)]
        atomic_write_text(results_dir / "summary_latency.csv", _csv(LATENCY_HEADER, found.latency))
        written.append(results_dir / "summary_latency.csv")
    if found.demo:
        where = ", ".join(f"{e} on {d}" if len(found.demo_devices) > 1 else f"on {d}"
                          for e, d in found.demo_devices.items())
        tables.append(TableData(f"Demo: passkey retrieval (sale demo) {where}", DEMO_HEADER, found.demo, 3))
        md += ([""] if md else []) + [f"## Demo passkey retrieval {where}", "",
                                      *_markdown(DEMO_HEADER, found.demo, 3)]
    atomic_write_text(results_dir / "summary.md", "\n".join(md) + "\n")
    return Summary(tables, [results_dir / "summary.md", *written])
