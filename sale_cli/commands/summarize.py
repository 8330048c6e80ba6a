"""The `sale summarize` command: the experiments under a results folder side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sale_cli.commands.benchmarks import ResultsOpt
from sale_cli.commands.common import error_exit
from sale_cli.errors import UserError
from sale_cli.eval.common import experiment_dir


def _show(console, table) -> None:
    from rich.table import Table

    shown = Table(title=table.title)
    for i, col in enumerate(table.header):  # text columns may wrap, numbers stay whole
        shown.add_column(col, justify="left" if i < table.left else "right", overflow="fold", no_wrap=i >= table.left)
    for row in table.body:
        shown.add_row(*(cell or "—" for cell in row))
    console.print(shown)


def summarize(
    exp: Annotated[list[str] | None, typer.Option(
        "--exp", help="Experiments to compare, repeated or comma-separated. Default: all under RESULTS_DIR.")] = None,
    results_dir: ResultsOpt = Path("results"),
) -> None:
    """Compare the experiments under RESULTS_DIR, one table per kind of result (all of them in summary.md).

    LongBench/InfiniteBench: scores, attention time and density per experiment (also summary.csv, summary.png).

    Latency (latency.json of `sale latency`): per length, dense and SALE attention ms, speedup, SALE density (also summary_latency.csv).

    Demo (demo/passkey.json of `sale demo`): accuracy, density and time per method.

    Folders or files it cannot use (a failed run, an unreadable result.json) are skipped with a one-line note.
    """
    from rich.console import Console

    from sale_cli.eval import summary

    try:
        names = [n.strip() for v in exp or [] for n in v.split(",") if n.strip()] or None
        for name in names or []:
            experiment_dir(results_dir, name)
        console = Console()
        found = summary.collect(results_dir, names)
        for note in found.skipped:
            console.print(f"skipped {note}", soft_wrap=True, markup=False, highlight=False)
        done = summary.summarize(results_dir, found, names)
        for table in done.tables:
            _show(console, table)
        print("wrote " + ", ".join(str(p) for p in done.written))
    except (UserError, ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        raise error_exit(err) from err
