"""The `sale calibrate` command: per-head thresholds, and the held-out check of a thresholds file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sale_cli.commands.common import PREFILL_CHUNK_HELP, check_theta, require, sale_options
from sale_cli.kernels import constants as C


def calibrate(
    model: Annotated[str, typer.Argument(help="HF id, local directory, .gguf file or the demo alias.")] = "smollm2-135m",
    theta: Annotated[float, typer.Option(help="Error bound per head: mean L1 error of a head's output per row.")] = 0.4,
    samples: Annotated[int | None, typer.Option(help="Calibration samples \\[default: 6; demo model: 3].")] = None,
    tokens: Annotated[int | None, typer.Option(help="Tokens per sample \\[default: 120000; demo model: 2048].")] = None,
    tau0: Annotated[float, typer.Option(help="Starting tau of every head (halved while the error is too large).")] = C.TAU0,
    out: Annotated[Path | None, typer.Option(help="Output file \\[default: theta_<theta>.safetensors in RESULTS_DIR/calibration/<model>/].")] = None,
    results_dir: Annotated[Path, typer.Option(help="Where results go.")] = Path("results"),
    block_q: Annotated[int, typer.Option(help="Query block size.")] = C.BLOCK_Q,
    block_k: Annotated[int, typer.Option(help="Key block size.")] = C.BLOCK_K,
    sink_tokens: Annotated[int | None, typer.Option(help="Sink tokens always computed \\[default: one key block].")] = None,
    local_window: Annotated[int, typer.Option(help="Local window (tokens) always computed.")] = C.LOCAL_WINDOW,
    estimate: Annotated[str, typer.Option(help="Estimate precision: int8, int4 or none.")] = C.ESTIMATE,
    quant_group: Annotated[str, typer.Option(help="Quantization scale group: per_token or per_block.")] = C.QUANT_GROUP,
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
    dense_above: Annotated[float | None, typer.Option(help="Heads whose calibrated density exceeds this run dense "
                                                           "(tau 0), faster there \\[default: this GPU's "
                                                           "break-even density; off on the CPU]; 1 = never.")] = None,
):
    """Calibrate per-head SALE thresholds (halving search from tau0 until each head's error is below theta).

    Resumable: rerunning the same command continues after the last finished sample.
    """
    from sale_cli import calibrate as calib
    from sale_cli import demo_model, thresholds
    from sale_cli.break_even import DENSE_ABOVE_RULE, dense_above_ok
    from sale_cli.errors import UserError
    from sale_cli.eval.common import check_writable, check_writable_dir
    from sale_cli.runner import load_runner

    console = Console()
    check_theta(theta)
    require(samples is None or samples >= 1, "--samples", f"must be at least 1, got {samples}")
    require(tokens is None or tokens >= calib.MIN_TOKENS, "--tokens", f"must be at least {calib.MIN_TOKENS}, got {tokens}")
    require(math.isfinite(tau0) and tau0 >= 0, "--tau0", f"must be a finite number >= 0, got {tau0}")
    require(validate is None or validate >= 1, "--validate", f"must be at least 1, got {validate}")
    require(dense_above is None or dense_above_ok(dense_above), "--dense-above", f"{DENSE_ABOVE_RULE}, got {dense_above}")
    if check is not None and not check.is_file():
        raise UserError(f"--check {check}: no such thresholds file")
    demo = model == demo_model.ALIAS
    samples = samples if samples is not None else (calib.DEMO_SAMPLES if demo else calib.PAPER_SAMPLES)
    options = sale_options(block_q, block_k, sink_tokens, local_window, estimate, quant_group, backend)
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
                                       margin=margin, dense_above=dense_above, console=console)
        console.print(calib.summary_table(tau, density, f"{runner.model_name} thresholds, theta={theta:g}"))
        console.print(f"Wrote {out}")
    if check is not None or validate is not None:
        per_kind = validate or calib.VALIDATE_PER_KIND
        console.print(f"Held-out check: {per_kind} samples x {tokens} tokens of each kind")
        report = calib.check(runner, tau, theta, tokens=tokens, per_kind=per_kind, thresholds_path=out, console=console)
        console.print(calib.check_table(report, f"{runner.model_name}, {out.name}: held-out check"))
        console.print(f"Wrote {calib.check_path(out)}")
