"""The `sale` command line: one small function per command; the work lives in the task modules."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
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
console = Console()
PREFILL_CHUNK_HELP = ("Tokens per prefill chunk: a multiple of 64, 0 = the whole prompt at once. "
                      "\\[default: chosen from the model and the free GPU memory; 0 on CPU]")


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


@app.command()
def info():
    """Show versions, GPUs, available attention backends and whether the demo model is present."""
    import platform

    import torch
    import transformers

    from sale_cli import __version__, demo_model
    from sale_cli.kernels import available_backends

    table = Table(title="sale environment", show_header=False)
    table.add_column(overflow="fold")
    table.add_column(overflow="fold")  # long paths and reasons wrap instead of being cut at the terminal width
    table.add_row("sale", __version__)
    table.add_row("python", platform.python_version())
    table.add_row("torch", torch.__version__)
    table.add_row("transformers", transformers.__version__)
    table.add_row("CUDA (torch build)", str(torch.version.cuda))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            table.add_row(f"GPU {i}", f"{torch.cuda.get_device_name(i)} (sm_{major}{minor})")
            free, total = torch.cuda.mem_get_info(i)
            table.add_row(f"GPU {i} memory", f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
    else:
        table.add_row("GPUs", "none visible")
    backends = available_backends()
    for name, status in backends.items():
        table.add_row(f"SALE backend: {name}", status)
    if backends.get("cuda") == "available":
        from sale_cli.kernels import cuda_backend

        table.add_row("SALE compute pass (auto)", cuda_backend.default_compute())
    from sale_cli.runner import probe_dense_backend

    table.add_row("dense attention", probe_dense_backend())
    path = demo_model.cached_path()
    table.add_row(f"demo model ({demo_model.ALIAS})", str(path) if path else "not fetched yet (fetched on first use)")
    console.print(table)


def _options(block_q: int, block_k: int, sink_tokens: int | None, local_window: int, estimate: str,
             quant_group: str, backend: str):
    from sale_cli.options import SaleOptions

    try:
        return SaleOptions(block_q=block_q, block_k=block_k, sink_tokens=sink_tokens, local_window=local_window,
                           estimate=estimate, quant_group=quant_group, backend=backend)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _check(ok: bool, option: str, message: str) -> None:
    if not ok:
        raise typer.BadParameter(message, param_hint=option)


def _check_theta(theta: float) -> None:
    _check(math.isfinite(theta) and theta > 0, "--theta", f"must be a finite number > 0, got {theta}")


@app.command()
def calibrate(
    model: Annotated[str, typer.Argument(help="HF id, local directory, .gguf file or the demo alias.")] = "smollm2-135m",
    theta: Annotated[float, typer.Option(help="Error bound per head: mean L1 error of a head's output per row.")] = 0.4,
    samples: Annotated[int | None, typer.Option(help="Calibration samples \\[default: 6; demo model: 3].")] = None,
    tokens: Annotated[int | None, typer.Option(help="Tokens per sample \\[default: 120000; demo model: 2048].")] = None,
    tau0: Annotated[float, typer.Option(help="Starting tau of every head (halved while the error is too large).")] = 0.008,
    out: Annotated[Path | None, typer.Option(help="Output file \\[default: theta_<theta>.safetensors in RESULTS_DIR/calibration/<model>/].")] = None,
    results_dir: Annotated[Path, typer.Option(help="Where results go.")] = Path("results"),
    block_q: Annotated[int, typer.Option(help="Query block size.")] = 64,
    block_k: Annotated[int, typer.Option(help="Key block size.")] = 32,
    sink_tokens: Annotated[int | None, typer.Option(help="Sink tokens always computed \\[default: one key block].")] = None,
    local_window: Annotated[int, typer.Option(help="Local window (tokens) always computed.")] = 128,
    estimate: Annotated[str, typer.Option(help="Estimate precision: int8, int4 or none.")] = "int8",
    quant_group: Annotated[str, typer.Option(help="Quantization scale group: per_token or per_block.")] = "per_token",
    backend: Annotated[str, typer.Option(help="Attention backend: auto, reference or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Model dtype: auto, bfloat16, float16, float32.")] = "auto",
    device: Annotated[str, typer.Option(help="Device: auto, cpu, cuda, cuda:N.")] = "auto",
    device_map: Annotated[str | None, typer.Option(help="'auto' spreads the model over all GPUs (accelerate).")] = None,
    prefill_chunk: Annotated[int | None, typer.Option(help=PREFILL_CHUNK_HELP)] = None,
    data: Annotated[str, typer.Option(help="Calibration text: kv, prose, code, mix (cycles the three) or a .txt/.jsonl "
                                           "file or folder (jsonl: a \"text\" field per line).")] = "mix",
    margin: Annotated[float, typer.Option(help="Fit each head against theta*(1-margin), headroom for unseen text.")] = 0.25,
    validate: Annotated[int | None, typer.Option(help="After calibrating, check N held-out samples of each kind "
                                                      "(kv, prose, code).")] = None,
    check: Annotated[Path | None, typer.Option(help="Only run the held-out check of this thresholds file "
                                                    "(--validate N samples per kind, default 3).")] = None,
):
    """Calibrate per-head SALE thresholds (halving search from tau0 until each head's error is below theta).

    Resumable: rerunning the same command continues after the last finished sample.
    """
    from sale_cli import calibrate as calib
    from sale_cli import demo_model, thresholds
    from sale_cli.errors import UserError
    from sale_cli.eval.common import check_writable, check_writable_dir
    from sale_cli.runner import load_runner

    _check_theta(theta)
    _check(samples is None or samples >= 1, "--samples", f"must be at least 1, got {samples}")
    _check(tokens is None or tokens >= calib.MIN_TOKENS, "--tokens", f"must be at least {calib.MIN_TOKENS}, got {tokens}")
    _check(math.isfinite(tau0) and tau0 >= 0, "--tau0", f"must be a finite number >= 0, got {tau0}")
    _check(validate is None or validate >= 1, "--validate", f"must be at least 1, got {validate}")
    if check is not None and not check.is_file():
        raise UserError(f"--check {check}: no such thresholds file")
    demo = model == demo_model.ALIAS
    samples = samples if samples is not None else (calib.DEMO_SAMPLES if demo else calib.PAPER_SAMPLES)
    options = _options(block_q, block_k, sink_tokens, local_window, estimate, quant_group, backend)
    if check is None:
        from sale_cli.data.calibration import CalibrationData

        CalibrationData(data)  # a bad --data fails before the model loads
        if out is not None:
            check_writable(out, "--out")
        else:
            check_writable_dir(results_dir / "calibration", "--results-dir")
    else:
        _, meta = thresholds.load(check)
        tokens = tokens or int(meta.get("tokens", 0)) or None
        options = None if "block_q" in meta else options  # the file's options, adopted by the runner
    tokens = tokens if tokens is not None else (calib.DEMO_TOKENS if demo else calib.PAPER_TOKENS)
    with console.status(f"loading {model}"):
        runner = load_runner(model, options=options, dtype=dtype, device=device, device_map=device_map,
                             prefill_chunk=prefill_chunk)
    if check is not None:
        runner.set_method("sale", check)
        tau, meta = thresholds.load(check)
        theta = float(meta.get("theta", theta))
        out = check
    else:
        out = out or thresholds.default_path(results_dir, runner.model_name, theta)
        console.print(f"Calibrating {runner.model_name}: theta={theta:g}, {samples} samples x {tokens} tokens "
                      f"(data {data}, margin {margin:g}), SALE backend {runner.sale_backend}, "
                      f"estimate {runner.options.estimate}, prefill chunk {runner.prefill_chunk or 'whole prompt'}")
        tau, density = calib.calibrate(runner, theta, samples=samples, tokens=tokens, out=out, tau0=tau0, data=data,
                                       margin=margin, console=console)
        console.print(calib.summary_table(tau, density, f"{runner.model_name} thresholds, theta={theta:g}"))
        console.print(f"Wrote {out}")
    if check is not None or validate is not None:
        per_kind = validate or calib.VALIDATE_PER_KIND
        console.print(f"Held-out check: {per_kind} samples x {tokens} tokens of each kind")
        report = calib.check(runner, tau, theta, tokens=tokens, per_kind=per_kind, thresholds_path=out, console=console)
        console.print(calib.check_table(report, f"{runner.model_name}, {out.name}: held-out check"))
        console.print(f"Wrote {calib.check_path(out)}")


@app.command()
def demo(
    theta: Annotated[float, typer.Option(help="Calibration error bound for the demo model.")] = 0.4,
    prompts: Annotated[int, typer.Option(help="Passkey prompts (lengths spread over 1.5K-4K tokens).")] = 8,
    results_dir: Annotated[Path, typer.Option(help="Where results go.")] = Path("results"),
    device: Annotated[str, typer.Option(help="Device: auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:N.")] = "auto",
    prefill_chunk: Annotated[int | None, typer.Option(help=PREFILL_CHUNK_HELP)] = None,
):
    """The main job on the demo model: fetch, calibrate, then passkey retrieval with dense vs SALE attention.

    Runs on a GPU when there is one (SALE then uses the CUDA kernel), else on the CPU; one table shows the device, each method's backend, accuracy, density and time."""
    from sale_cli.demo import run_demo
    from sale_cli.eval.common import check_writable_dir

    _check_theta(theta)
    _check(prompts >= 1, "--prompts", f"must be at least 1, got {prompts}")
    check_writable_dir(results_dir, "--results-dir")
    run_demo(theta=theta, prompts=prompts, results_dir=results_dir, console=console, device=device,
             prefill_chunk=prefill_chunk)


def _register_tasks():
    from sale_cli.eval.bench_op import bench_op
    from sale_cli.eval.commands import infinitebench, longbench, summarize
    from sale_cli.eval.latency_command import latency
    from sale_cli.plan_command import plan

    for fn in (latency, bench_op, longbench, infinitebench, summarize, plan):
        app.command()(fn)


_register_tasks()

if __name__ == "__main__":
    main()
