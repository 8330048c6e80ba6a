"""The `sale demo` command: the main job on the embedded demo model, end to end on a GPU when there is one,
else the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sale_cli.commands.common import PREFILL_CHUNK_HELP, check_theta, require


def demo(
    theta: Annotated[float, typer.Option(help="Calibration error bound for the demo model.")] = 0.4,
    prompts: Annotated[int, typer.Option(help="Passkey prompts (lengths spread over 1.5K-4K tokens).")] = 8,
    results_dir: Annotated[Path, typer.Option(help="Where results go.")] = Path("results"),
    device: Annotated[str, typer.Option(help="Device: auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:N.")] = "auto",
    prefill_chunk: Annotated[int | None, typer.Option(help=PREFILL_CHUNK_HELP)] = None,
):
    """The main job on the demo model: fetch, calibrate, then passkey retrieval with dense vs SALE attention.

    Runs on a GPU when there is one (SALE then uses the CUDA kernel), else on the CPU; one table shows the device, each method's backend, accuracy, density and time."""
    from sale_cli.eval.common import check_writable_dir

    check_theta(theta)
    require(prompts >= 1, "--prompts", f"must be at least 1, got {prompts}")
    check_writable_dir(results_dir, "--results-dir")
    run_demo(theta=theta, prompts=prompts, results_dir=results_dir, console=Console(), device=device,
             prefill_chunk=prefill_chunk)


def run_demo(theta: float, prompts: int, results_dir: Path, console: Console, device: str = "auto",
             prefill_chunk: int | None = None):
    """Fetch the demo model, calibrate it (or reuse the calibration), then passkey retrieval dense vs SALE.

    ``device="auto"`` takes the GPU when there is one (SALE then runs the CUDA kernel where it supports the GPU).
    """
    from sale_cli import calibrate as calib
    from sale_cli import demo_model, thresholds
    from sale_cli.demo import passkey_eval, result_table, where
    from sale_cli.eval.common import atomic_write_json
    from sale_cli.runner import load_runner

    demo_model.fetch(report=console.print)  # says so (with the size) when it downloads, before the spinner
    with console.status("loading the demo model"):
        runner = load_runner(demo_model.ALIAS, device=device, prefill_chunk=prefill_chunk)
    place = where(runner)
    backends = {"dense": runner.dense_backend,
                "sale": "CUDA kernel" if runner.sale_backend == "cuda" else "reference"}
    console.print(f"Running on {place}: dense attention {backends['dense']}, SALE {backends['sale']}")
    path = thresholds.default_path(results_dir, runner.model_name, theta)
    if path.is_file():
        console.print(f"Using existing thresholds {path}")
    else:
        console.print(f"Calibrating {runner.model_name} at theta={theta:g} "
                      f"({calib.DEMO_SAMPLES} samples x {calib.DEMO_TOKENS} tokens)")
        tau, density = calib.calibrate(runner, theta, samples=calib.DEMO_SAMPLES, tokens=calib.DEMO_TOKENS,
                                       out=path, console=console)
        console.print(f"Calibrated: mean tau {tau.mean().item():.2e}, {int((tau == 0).sum())}/{tau.numel()} dense "
                      f"heads, expected density {density.mean().item():.3f}")
    records = []
    for method in ("dense", "sale"):
        runner.set_method(method, path if method == "sale" else None)
        records += passkey_eval(runner, prompts, lambda line: console.print(line, soft_wrap=True))
    console.print(result_table(records, runner.model_name, place, backends, prompts))
    if runner.sale_backend != "cuda":
        console.print("SALE ran the PyTorch reference backend (no CUDA kernel here): the table shows accuracy and "
                      "density, not speed.")
    out = Path(results_dir) / "demo" / "passkey.json"
    atomic_write_json(out, {"theta": theta, "thresholds": str(path), "device": place,
                            "dense_backend": backends["dense"], "sale_backend": backends["sale"],
                            "records": records})
    console.print(f"Wrote {out}")
