"""The `sale latency` command: needle-in-a-haystack prefill timing, dense vs SALE side by side."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sale_cli import demo_model
from sale_cli.commands.common import fail, split_values
from sale_cli.errors import UserError
from sale_cli.eval import niah
from sale_cli.eval.common import atomic_write_json, experiment_dir

METHODS = ("dense", "sale")
DEFAULT_FRACTIONS = (1.0, 0.5, 0.25, 0.125, 0.0625)


def default_theta(model: str, results_dir: Path, console: Console) -> float:
    """Calibrate's default theta when its thresholds file for `model` exists (said on the console); else UserError
    naming the command that makes it."""
    from sale_cli.calibrate import DEFAULT_THETA
    from sale_cli.runner import model_name
    from sale_cli.thresholds import default_path

    path = default_path(results_dir, model_name(model), DEFAULT_THETA)
    if not path.is_file():
        where = "" if results_dir == Path("results") else f" --results-dir {results_dir}"
        raise UserError(
            f"SALE needs thresholds and the default theta's file {path} does not exist: make it with "
            f"`sale calibrate {model} --theta {DEFAULT_THETA:g}{where}`, or pass --theta/--thresholds, "
            "or time --methods dense only."
        )
    console.print(f"SALE thresholds: {path} (calibrate's default theta {DEFAULT_THETA:g}; --theta or --thresholds "
                  "for others)", soft_wrap=True)
    return DEFAULT_THETA


def latency(
    model: Annotated[
        str,
        typer.Argument(
            help="Model: alias, HF id, local folder or .gguf file. With --random-weights a folder holding only "
            "config.json and a tokenizer is enough.",
        ),
    ] = demo_model.ALIAS,
    methods: Annotated[
        list[str] | None,
        typer.Option(
            help="Methods to time, interleaved: dense, sale (comma-separated or repeated). \\[default: dense,sale]"
        ),
    ] = None,
    length: Annotated[
        int, typer.Option(help="Longest prompt in tokens; --fractions of it are timed.")
    ] = 131072,
    fractions: Annotated[
        list[str] | None,
        typer.Option(
            help="Fractions of --length to time (comma-separated or repeated). \\[default: 1,0.5,0.25,0.125,0.0625]"
        ),
    ] = None,
    lengths: Annotated[
        list[str] | None,
        typer.Option(
            help="Explicit prompt lengths in tokens (comma-separated or repeated); overrides --fractions."
        ),
    ] = None,
    depth: Annotated[
        float, typer.Option(help="Where the needle goes, as a fraction of the haystack (0 = start, 1 = end).")
    ] = 0.5,
    haystack: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="UTF-8 .txt or .txt.gz haystack text. \\[default: the bundled novel Botchan, repeated as needed]",
        ),
    ] = None,
    needle: Annotated[
        str, typer.Option(help="The needle sentence inserted into the haystack.")
    ] = niah.DEFAULT_NEEDLE,
    question: Annotated[str, typer.Option(help="The question after the haystack.")] = niah.DEFAULT_QUESTION,
    expect: Annotated[
        str, typer.Option(help="Text an answer must contain for the needle to count as recovered (--answer).")
    ] = niah.DEFAULT_EXPECT,
    repeats: Annotated[
        int, typer.Option(help="Timed prefills per method and length; the median is reported.")
    ] = 5,
    warmup: Annotated[
        int, typer.Option(help="Untimed prefills per method and length before the timed ones.")
    ] = 1,
    answer: Annotated[
        bool,
        typer.Option(
            "--answer/--no-answer", help="Also generate an answer and check that the needle was found."
        ),
    ] = False,
    answer_tokens: Annotated[int, typer.Option(help="Tokens to generate for --answer.")] = 24,
    theta: Annotated[
        float | None,
        typer.Option(
            help="Use the calibrated SALE thresholds: file theta_<THETA>.safetensors in the model's folder under "
            "RESULTS_DIR/calibration/. "
            "\\[default: calibrate's default theta, 0.4, when its file exists]"
        ),
    ] = None,
    thresholds: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="SALE thresholds .safetensors file (instead of --theta)."
        ),
    ] = None,
    random_weights: Annotated[
        bool,
        typer.Option(
            "--random-weights",
            help="Build the model from its config with random weights (timing only: answers are meaningless).",
        ),
    ] = False,
    dtype: Annotated[str, typer.Option(help="Model dtype: auto, bfloat16, float16 or float32.")] = "auto",
    device: Annotated[str, typer.Option(help="Device: auto, cpu, cuda or cuda:N.")] = "auto",
    device_map: Annotated[
        str | None, typer.Option(help="Spread the model over devices, e.g. 'auto' for all GPUs (accelerate).")
    ] = None,
    results_dir: Annotated[
        Path, typer.Option(help="Results root; writes latency.json into RESULTS_DIR/EXP/.")
    ] = Path("results"),
    exp: Annotated[
        str | None, typer.Option(help="Experiment name. \\[default: latency-<model name>]")
    ] = None,
    prefill_chunk: Annotated[
        int | None,
        typer.Option(
            help="Tokens per prefill chunk: a multiple of 64, 0 = the whole prompt at once; the prefill time "
            "spans all chunks. \\[default: chosen from the model and the free GPU memory; 0 on CPU]"
        ),
    ] = None,
) -> None:
    """Needle-in-a-haystack prefill latency up to 128K tokens, dense vs SALE side by side.

    Each prompt is the haystack cut (or repeated) to exactly the length,
    with the needle at --depth; the question is always kept.
    Methods take turns at every length: warm-up, then --repeats timed prefills;
    the table shows medians of prefill and summed attention time, SALE's
    density and quantization/selection overhead where the kernel tells it.
    Writes RESULTS_DIR/EXP/latency.json.
    """
    if exp is not None:
        experiment_dir(results_dir, exp)  # a plain folder name under --results-dir
    method_list = split_values(methods, str, "--methods") or list(METHODS)
    unknown = [m for m in method_list if m not in METHODS]
    if unknown or len(set(method_list)) != len(method_list):
        raise typer.BadParameter(
            f"expected distinct methods from {', '.join(METHODS)}, got {', '.join(method_list)}",
            param_hint="--methods",
        )
    try:
        length_list = niah.resolve_lengths(
            length,
            split_values(fractions, float, "--fractions") or DEFAULT_FRACTIONS,
            split_values(lengths, int, "--lengths"),
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--length/--fractions/--lengths") from exc
    for value, option, low in (
        (repeats, "--repeats", 1),
        (warmup, "--warmup", 0),
        (answer_tokens, "--answer-tokens", 1),
    ):
        if value < low:
            raise typer.BadParameter(f"must be at least {low}, got {value}", param_hint=option)
    if not 0.0 <= depth <= 1.0:
        raise typer.BadParameter(f"must be in [0, 1], got {depth}", param_hint="--depth")
    if thresholds is not None and theta is not None:
        raise typer.BadParameter("give --thresholds or --theta, not both", param_hint="--thresholds/--theta")
    console = Console()
    if "sale" in method_list and thresholds is None and theta is None:
        theta = default_theta(model, results_dir, console)
    try:
        text = niah.load_haystack(haystack)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--haystack") from exc
    if answer:
        try:
            niah.answer_key(expect)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--expect") from exc

    from sale_cli.runner import load_runner

    try:
        runner = load_runner(
            model,
            method="sale" if "sale" in method_list else "dense",
            thresholds=str(thresholds) if thresholds else None,
            theta=theta,
            results_dir=str(results_dir),
            dtype=dtype,
            device=device,
            device_map=device_map,
            random_weights=random_weights,
            prefill_chunk=prefill_chunk,
            length=max(length_list),
        )
    except (ValueError, RuntimeError) as exc:
        raise fail(str(exc)) from exc
    builder = niah.NiahPromptBuilder(runner.tokenizer, text, needle, question, runner.apply_chat_template)
    try:
        prompts = {n: builder.build(n, depth) for n in length_list}
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--length/--fractions/--lengths") from exc
    too_long = [n for n in length_list if n > runner.max_context]
    if too_long:
        console.print(
            f"[yellow]Lengths {too_long} exceed {runner.model_name}'s context limit of {runner.max_context} tokens: "
            "timings are valid, needle answers are not meaningful.[/]"
        )
    if max(p.haystack_copies for p in prompts.values()) > 1:
        console.print("[dim]The haystack text is repeated to fill the longest prompts.[/]")
    env = niah.environment(runner)
    measurements = niah.run_benchmark(
        runner, prompts, method_list, repeats, warmup, answer_tokens if answer else 0, expect, console
    )
    records = niah.summarize(measurements, prompts, env)
    payload = {
        "environment": env,
        "config": {
            "model": model,
            "methods": method_list,
            "lengths": length_list,
            "depth": depth,
            "repeats": repeats,
            "warmup": warmup,
            "haystack": str(haystack) if haystack else niah.BUNDLED_HAYSTACK,
            "needle": needle,
            "question": question,
            "expect": expect,
            "answer_tokens": answer_tokens if answer else 0,
            "theta": theta,
            "thresholds": str(runner.thresholds_path) if runner.thresholds_path else None,
            "random_weights": random_weights,
            "dtype": dtype,
            "device_map": device_map,
            "prefill_chunk": runner.prefill_chunk,
        },
        "records": records,
    }
    path = results_dir / (exp or f"latency-{runner.model_name}") / "latency.json"
    atomic_write_json(path, payload)
    console.print(niah.latency_table(records, env))
    console.print(f"Wrote {path}")
