"""`sale summarize`: scores, attention time and density of experiments side by side (table, .md, .csv, .png)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from sale_cli.eval import infinitebench, longbench
from sale_cli.eval.common import Benchmark, atomic_write_text, mean_or_none

BENCHES: list[Benchmark] = [longbench.BENCH, infinitebench.BENCH]
ATTN_ROW, DENSITY_ROW = "attention ms (mean)", "density (mean)"


def _scores(bench: Benchmark, exp_dir: Path) -> dict[str, float]:
    """result.json when it is newer than every prediction file, else a fresh (unwritten) scoring."""
    result = exp_dir / bench.name / "result.json"
    files = list((exp_dir / bench.name).glob("*.jsonl"))
    if result.exists() and all(f.stat().st_mtime <= result.stat().st_mtime for f in files):
        return bench.read_result(exp_dir)
    return bench.score(exp_dir, write=False)


def collect(results_dir: Path, exps: list[str] | None) -> dict[str, dict[str, dict]]:
    """{experiment: {benchmark: {"scores": {...}, "attn_ms": x, "density": y}}}."""
    if exps is None:
        exps = sorted(p.name for p in results_dir.iterdir()
                      if p.is_dir() and any((p / b.name).is_dir() for b in BENCHES)) if results_dir.is_dir() else []
        if not exps:
            raise FileNotFoundError(f"--results-dir: no experiments with benchmark results under {results_dir}")
    data: dict[str, dict[str, dict]] = {}
    for exp in exps:
        exp_dir = results_dir / exp
        present = [(b, names) for b in BENCHES if (names := b.available(exp_dir))]
        if not present:
            raise FileNotFoundError(f"--exp: no benchmark predictions under {exp_dir}")
        data[exp] = {}
        for bench, names in present:
            records = [r for n in names for r in bench.predictions(exp_dir, n).records()]
            data[exp][bench.name] = {
                "scores": _scores(bench, exp_dir),
                "attn_ms": mean_or_none([r.get("attn_ms") for r in records]),
                "density": mean_or_none([r.get("density") for r in records]),
            }
    return data


def rows(data: dict[str, dict[str, dict]]) -> list[list[str]]:
    """Table rows [benchmark, row name, one cell per experiment]."""
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
        for label, field, fmt in ((ATTN_ROW, "attn_ms", "{:.1f}"), (DENSITY_ROW, "density", "{:.3f}")):
            out.append([bench.name, label, *(fmt.format(r[field]) if r and r[field] is not None else ""
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


def summarize(results_dir: Path, exps: list[str] | None = None) -> list[list[str]]:
    """Print the comparison table and write summary.md, summary.csv and summary.png into `results_dir`."""
    from rich.console import Console
    from rich.table import Table

    data = collect(results_dir, exps)
    header = ["benchmark", "dataset", *data]
    body = rows(data)

    table = Table(title=f"SALE evaluation ({results_dir})")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i < 2 else "right")
    for row in body:
        table.add_row(*(cell or "—" for cell in row))
    Console().print(table)

    md = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * len(data)) + "|"]
    md += ["| " + " | ".join(cell or "—" for cell in row) + " |" for row in body]
    atomic_write_text(results_dir / "summary.md", "\n".join(md) + "\n")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *body])
    atomic_write_text(results_dir / "summary.csv", buf.getvalue())
    _plot(data, results_dir / "summary.png")
    print(f"wrote {results_dir / 'summary.md'}, {results_dir / 'summary.csv'}, {results_dir / 'summary.png'}")
    return body
