"""Passkey retrieval on the demo model (what `sale demo` runs): prompts, per-prompt records and the result table."""

from __future__ import annotations

from collections.abc import Callable

from rich.markup import escape
from rich.table import Table

from sale_cli.data.passkey import found_key, passkey_prompt

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


def passkey_eval(runner, count: int, report: Callable[[str], None] | None = None, seed0: int = 0) -> list[dict]:
    """Generate for ``count`` fixed passkey prompts with the runner's current method; one record per prompt.

    ``report`` gets a line (Rich markup) per prompt as it is done."""
    records = []
    for i, length in enumerate(demo_lengths(count)):
        prompt, key = passkey_prompt(seed0 + i, length, lambda t: len(runner.tokenizer(t).input_ids))
        res = runner.generate(runner.tokenizer(prompt).input_ids, max_new_tokens=8)
        records.append(dict(method=runner.method, prompt=i, tokens=res.input_tokens, key=key, output=res.text,
                            correct=found_key(res.text, key), density=res.density, prefill_ms=res.prefill_ms,
                            attn_ms=res.attn_ms))
        if report:
            mark = "ok" if records[-1]["correct"] else "MISS"
            report(f"  {runner.method:5s} prompt {i}: {res.input_tokens} tokens, density {res.density:.3f}, "
                   f"{res.prefill_ms / 1000:.2f}s prefill, {mark} {shown_text(res.text)}")
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
