"""`sale demo`: the main job on the embedded demo model, end to end on a CPU."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from sale_cli import calibrate as calib
from sale_cli import demo_model, thresholds
from sale_cli.data.passkey import found_key, passkey_prompt
from sale_cli.eval.common import atomic_write_json
from sale_cli.runner import load_runner

DEMO_LENGTHS = (1536, 2048, 2560, 3072, 3584, 4096)


def demo_lengths(count: int) -> list[int]:
    """``count`` prompt lengths cycling over 1.5K-4K tokens."""
    return [DEMO_LENGTHS[i % len(DEMO_LENGTHS)] for i in range(count)]


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
                          f"{res.prefill_ms / 1000:.1f}s prefill, {mark} ({res.text.strip()!r})")
    return records


def run_demo(theta: float, prompts: int, results_dir: Path, console: Console, prefill_chunk: int | None = None):
    """Fetch the demo model, calibrate it (or reuse the calibration), then passkey retrieval dense vs SALE."""
    with console.status("fetching and loading the demo model"):
        runner = load_runner(demo_model.ALIAS, device="cpu", prefill_chunk=prefill_chunk)
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
    table = Table(title=f"Passkey retrieval, {runner.model_name} on CPU ({prompts} prompts, 1.5K-4K tokens)")
    for col in ("method", "accuracy", "density", "prefill s (mean)", "attention s (mean)"):
        table.add_column(col, justify="right")
    for method in ("dense", "sale"):
        rows = [r for r in records if r["method"] == method]
        n = len(rows)
        table.add_row(method, f"{sum(r['correct'] for r in rows)}/{n}", f"{sum(r['density'] for r in rows) / n:.3f}",
                      f"{sum(r['prefill_ms'] for r in rows) / n / 1000:.2f}",
                      f"{sum(r['attn_ms'] for r in rows) / n / 1000:.2f}")
    console.print(table)
    console.print("SALE runs the PyTorch reference backend on CPU: it shows accuracy and density, not speed.")
    out = Path(results_dir) / "demo" / "passkey.json"
    atomic_write_json(out, {"theta": theta, "thresholds": str(path), "records": records})
    console.print(f"Wrote {out}")
