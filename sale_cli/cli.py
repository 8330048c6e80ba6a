"""The `sale` command line: the app, its error handling and entry point; the commands live in sale_cli.commands."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from sale_cli.errors import UserError, debug_enabled, set_debug


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message for an exception that is the user's to fix; None for anything else (a bug)."""
    from safetensors import SafetensorError

    if isinstance(exc, (UserError, ValueError)):
        return str(exc)
    if isinstance(exc, OSError):  # missing, unreadable or unwritable files, a full disk
        if exc.filename is not None and exc.strerror:
            return f"{exc.filename}: {exc.strerror}"
        return str(exc)
    if isinstance(exc, SafetensorError):
        return f"corrupt or truncated .safetensors file ({exc})"
    return None


class SaleGroup(TyperGroup):
    """The app's command group: a user error from any command ends as one red line and exit code 1.

    --debug (or SALE_DEBUG=1) shows the full traceback instead; click's own usage errors keep exit code 2.
    """

    def main(self, *args, **kwargs):
        set_debug(False)
        try:
            return super().main(*args, **kwargs)
        except Exception as exc:
            message = user_error_message(exc)
            if message is None or debug_enabled():
                raise
            typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
            sys.exit(1)


app = typer.Typer(
    cls=SaleGroup,
    help="SALE sparse attention for long-context prefill: calibrate thresholds, time prefill, evaluate accuracy.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error (or set SALE_DEBUG=1).")] = False,
):
    set_debug(debug)


def main() -> None:
    """The `sale` console entry point."""
    # Chunked prefill allocates blocks of ever-growing sizes (the KV prefix, per-chunk workspaces): without
    # expandable segments the caching allocator fragments, and a 32-layer 128K SALE prefill that needs 32.8 GiB
    # ran out of memory under a 44 GiB cap on an H200 (it fits with them). Set before torch initializes CUDA.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    app()


def _register_commands() -> None:
    from sale_cli.commands import bench_op, benchmarks, calibrate, demo, info, latency, plan, summarize

    for fn in (info.info, calibrate.calibrate, demo.demo, latency.latency, bench_op.bench_op, benchmarks.longbench,
               benchmarks.infinitebench, summarize.summarize, plan.plan):
        app.command()(fn)


_register_commands()

if __name__ == "__main__":
    main()
