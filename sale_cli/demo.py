"""`sale demo`: the main job on the embedded demo model, end to end on a GPU when there is one, else the CPU."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sale_cli import calibrate as calib
from sale_cli import demo_model, thresholds
from sale_cli.data.passkey import found_key, passkey_prompt
from sale_cli.eval.common import atomic_write_json
from sale_cli.runner import load_runner

DEMO_LENGTHS = (1536, 2048, 2560, 3072, 3584, 4096)
SHOWN_CHARS = 40  # of a generated answer, on its prompt's line


def demo_lengths(count: int) -> list[int]:
    """``count`` prompt lengths cycling over 1.5K-4K tokens."""
    return [DEMO_LENGTHS[i % len(DEMO_LENGTHS)] for i in range(count)]


def shown_text(text: str, limit: int = SHOWN_CHARS) -> str:
    """A generated text on one line: whitespace runs (newlines included) collapsed to one space, cut to `limit`
    characters, quoted; safe to print as Rich markup."""
    flat = " ".join(text.split())
    if len(flat) > limit:
        flat = flat[: limit - 1] + "…"
    return escape(repr(flat))


def where(runner) -> str:
    """The device the runner's model is on, in words: "CPU" or "<GPU name> (cuda:N)"."""
    import torch

    device = runner.device
    if device.type != "cuda":
        return device.type.upper()
    return f"{torch.cuda.get_device_name(device)} ({device.type}:{device.index or 0})"


def passkey_eval(runner, count: int, console: Console | None = None, seed0: int = 0) -> list[dict]:
    """Generate for ``count`` fixed passkey prompts with the runner's current method; one record per prompt."""
    records = []
    for i, length in enumerate(demo_lengths(count)):
        prompt, key = passkey_prompt(seed0 + i, length, lambda t: len(runner.tokenizer(t).input_ids))
        res = runner.generate(runner.tokenizer(prompt).input_ids, max_new_tokens=8)
        records.append(dict(method=runner.method, prompt=i, tokens=res.input_tokens, key=key, output=res.text,
                            correct=found_key(res.text, key), density=res.density, prefill_ms=res.prefill_ms,
                            attn_ms=res.attn_ms))
        if console:
            mark = "ok" if records[-1]["correct"] else "MISS"
            console.print(f"  {runner.method:5s} prompt {i}: {res.input_tokens} tokens, density {res.density:.3f}, "
                          f"{res.prefill_ms / 1000:.2f}s prefill, {mark} {shown_text(res.text)}", soft_wrap=True)
    return records


def result_table(records: list[dict], model: str, place: str, backends: dict[str, str], prompts: int) -> Table:
    """Accuracy, density and mean times per method; the title says where it ran, a column which backend."""
    table = Table(title=f"Passkey retrieval, {model} on {place} ({prompts} prompts, 1.5K-4K tokens)")
    for col in ("method", "backend", "accuracy", "density", "prefill s (mean)", "attention s (mean)"):
        table.add_column(col, justify="left" if col in ("method", "backend") else "right")
    for method in ("dense", "sale"):
        rows = [r for r in records if r["method"] == method]
        n = len(rows)
        table.add_row(method, backends[method], f"{sum(r['correct'] for r in rows)}/{n}",
                      f"{sum(r['density'] for r in rows) / n:.3f}",
                      f"{sum(r['prefill_ms'] for r in rows) / n / 1000:.2f}",
                      f"{sum(r['attn_ms'] for r in rows) / n / 1000:.2f}")
    return table


def run_demo(theta: float, prompts: int, results_dir: Path, console: Console, device: str = "auto",
             prefill_chunk: int | None = None):
    """Fetch the demo model, calibrate it (or reuse the calibration), then passkey retrieval dense vs SALE.

    ``device="auto"`` takes the GPU when there is one (SALE then runs the CUDA kernel where it supports the GPU).
    """
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
        records += passkey_eval(runner, prompts, console)
    console.print(result_table(records, runner.model_name, place, backends, prompts))
    if runner.sale_backend != "cuda":
        console.print("SALE ran the PyTorch reference backend (no CUDA kernel here): the table shows accuracy and "
                      "density, not speed.")
    out = Path(results_dir) / "demo" / "passkey.json"
    atomic_write_json(out, {"theta": theta, "thresholds": str(path), "device": place,
                            "dense_backend": backends["dense"], "sale_backend": backends["sale"],
                            "records": records})
    console.print(f"Wrote {out}")
