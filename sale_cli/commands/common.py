"""Option parsing and checks shared by the commands: the CLI side of library errors."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import typer

from sale_cli.errors import debug_enabled

PREFILL_CHUNK_HELP = ("Tokens per prefill chunk: a multiple of 64, 0 = the whole prompt at once. "
                      "\\[default: chosen from the model and the free GPU memory; 0 on CPU]")


def fail(message: str) -> typer.Exit:
    """Print `error: message` in red on stderr; raise the returned Exit (code 1)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=1)


def error_exit(err: Exception) -> typer.Exit:
    """`fail` with a library error's message; under --debug the error itself is raised (full traceback)."""
    if debug_enabled():
        raise err
    return fail(str(err))


def require(ok: bool, option: str, message: str) -> None:
    if not ok:
        raise typer.BadParameter(message, param_hint=option)


def check_theta(theta: float) -> None:
    require(math.isfinite(theta) and theta > 0, "--theta", f"must be a finite number > 0, got {theta}")


def sale_options(block_q: int, block_k: int, sink_tokens: int | None, local_window: int, estimate: str,
                 quant_group: str, backend: str):
    """SaleOptions from the op options, a bad value as a usage error."""
    from sale_cli.options import SaleOptions

    try:
        return SaleOptions(block_q=block_q, block_k=block_k, sink_tokens=sink_tokens, local_window=local_window,
                           estimate=estimate, quant_group=quant_group, backend=backend)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def split_values(values: list[str] | None, cast: Callable[[str], Any], option: str) -> list[Any]:
    """Items of a repeatable option whose values may also be comma- or space-separated lists."""
    items = []
    for value in values or []:
        for item in re.split(r"[,\s]+", value.strip()):
            if not item:
                continue
            try:
                items.append(cast(item))
            except ValueError as exc:
                raise typer.BadParameter(
                    f"{item!r} is not a valid {cast.__name__}", param_hint=option
                ) from exc
    return items


def parse_names(values: Iterable[str] | None, known: Sequence[str], default: Sequence[str], option: str,
                allow_all: bool = True) -> list[str]:
    """Distinct names from repeated and/or comma- or space-separated option values; 'all' (where allowed) means
    every known name. ValueError naming the option for an unknown name."""
    names = split_values(list(values) if values else None, str, option)
    if not names:
        return list(default)
    if allow_all and "all" in names:
        return list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        choices = ", ".join(known) + (" or 'all'" if allow_all else "")
        raise ValueError(f"{option}: unknown {', '.join(unknown)}; choose from {choices}")
    return list(dict.fromkeys(names))


def parse_choices(values: list[str] | None, known: Sequence[str], default: Sequence[str], option: str) -> tuple:
    """`parse_names` without 'all', as a BadParameter naming the option."""
    try:
        return tuple(parse_names(values, known, default, option, allow_all=False))
    except ValueError as exc:
        raise typer.BadParameter(str(exc).removeprefix(f"{option}: "), param_hint=option) from exc
