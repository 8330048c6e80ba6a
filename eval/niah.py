"""Needle-in-a-haystack prompts and interleaved dense-vs-SALE prefill timing for `sale latency`."""

from __future__ import annotations

import gzip
import os
import platform
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sale_cli.eval.common import software_versions

BUNDLED_HAYSTACK = "haystack/botchan.txt.gz"
DEFAULT_NEEDLE = "The secret number hidden in this story is 4817."
DEFAULT_QUESTION = "What is the secret number hidden in this story?"
DEFAULT_EXPECT = "4817"
PROMPT = (
    "Below is a long text. One sentence in it states a fact that does not belong to the story. "
    "Read the text, then answer the question after it.\n\n"
    "<text>\n{haystack}\n</text>\n\n"
    "Question: {question} Answer briefly."
)
SPLIT_KEYS = ("quant", "select", "compute")
_MARKER = "<<HAYSTACK>>"
# Sentence ends (optionally followed by a closing quote) and paragraph breaks; each piece keeps its leading space.
_BOUNDARY = re.compile(r"(?<=[.!?])(?=\s)|(?<=[.!?][\"'’”])(?=\s)|(?=\n\n)")


def load_haystack(path: str | os.PathLike | None = None) -> str:
    """Return the haystack text: the bundled novel, or a UTF-8 `.txt` / `.txt.gz` file at `path`."""
    if path is None:
        name = f"bundled {BUNDLED_HAYSTACK}"
        data = resources.files("sale_cli.data").joinpath(BUNDLED_HAYSTACK).read_bytes()
    else:
        name = f"--haystack {path}"
        if not Path(path).is_file():
            raise FileNotFoundError(f"{name}: no such file")
        data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    try:
        text = data.decode("utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name}: not UTF-8 text ({exc})") from exc
    if not text.strip():
        raise ValueError(f"{name}: the text is empty")
    return text


def split_sentences(text: str) -> list[str]:
    """Split `text` at sentence ends and paragraph breaks; the pieces join back to `text`."""
    return [piece for piece in _BOUNDARY.split(text) if piece]


@dataclass(frozen=True)
class NiahPrompt:
    """A token-exact needle-in-a-haystack prompt."""

    input_ids: list[int]
    needle_start: int  # token index of the needle's first token
    needle_tokens: int
    question_start: int  # token index where the closing part (text end, question, template tail) begins
    haystack_tokens: int
    haystack_copies: int  # how many times the haystack text was repeated to fill the length
    needle_depth: float  # where the needle landed, as a fraction of the haystack tokens


class NiahPromptBuilder:
    """Builds prompts of an exact token length: template head, haystack with the needle, question, template tail.

    Only the haystack is truncated (or repeated when the text is too short); the question is always kept.
    `chat_template` maps the user message to the model's chat-formatted prompt string (identity when None).
    """

    def __init__(
        self,
        tokenizer: Any,
        haystack: str,
        needle: str = DEFAULT_NEEDLE,
        question: str = DEFAULT_QUESTION,
        chat_template: Callable[[str], str] | None = None,
    ):
        if not needle.strip():
            raise ValueError("needle: the sentence is empty")
        if not question.strip():
            raise ValueError("question: the text is empty")
        user = PROMPT.format(haystack=_MARKER, question=question.strip())
        text = chat_template(user) if chat_template is not None else user
        if text.count(_MARKER) != 1:
            raise ValueError("chat template: it did not keep the user message intact")
        head, tail = text.split(_MARKER)
        self._tokenizer = tokenizer
        self.head = self._encode(head)
        if text == user and tokenizer.bos_token_id is not None and self._adds_bos():
            self.head = [tokenizer.bos_token_id, *self.head]
        self.tail = self._encode(tail)
        self.needle = self._encode(" " + needle.strip())
        pieces = split_sentences(haystack)
        ids = tokenizer(pieces, add_special_tokens=False)["input_ids"]
        if not any(ids):
            raise ValueError("haystack: the text encodes to no tokens")
        self._copy_first = [p for p in ids if p]
        # Later copies start after a paragraph break instead of running on from the previous copy's last word.
        self._copy_again = [p for p in [self._encode("\n\n" + pieces[0]), *ids[1:]] if p]

    def _encode(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def _adds_bos(self) -> bool:
        return self._tokenizer("a")["input_ids"][:1] == [self._tokenizer.bos_token_id]

    @property
    def fixed_tokens(self) -> int:
        """Tokens of everything but the haystack: template, question and needle."""
        return len(self.head) + len(self.tail) + len(self.needle)

    def _haystack(self, n: int) -> tuple[list[int], list[int], int]:
        """The first `n` haystack tokens, the sentence starts within them (0 and `n` included), copies used."""
        ids: list[int] = []
        starts: list[int] = []
        copies = 0
        while len(ids) < n:
            for piece in self._copy_first if copies == 0 else self._copy_again:
                starts.append(len(ids))
                ids.extend(piece)
            copies += 1
        return ids[:n], sorted({0, n, *(s for s in starts if s < n)}), copies

    def build(self, length: int, depth: float = 0.5) -> NiahPrompt:
        """A prompt of exactly `length` tokens with the needle at the sentence start nearest `depth`."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        if length < self.fixed_tokens:
            raise ValueError(
                f"length {length} is too short: the template, needle and question alone take {self.fixed_tokens} tokens"
            )
        n = length - self.fixed_tokens
        hay, starts, copies = self._haystack(n)
        target = depth * n
        at = min(starts, key=lambda s: (abs(s - target), s))
        ids = [*self.head, *hay[:at], *self.needle, *hay[at:], *self.tail]
        return NiahPrompt(
            input_ids=ids,
            needle_start=len(self.head) + at,
            needle_tokens=len(self.needle),
            question_start=length - len(self.tail),
            haystack_tokens=n,
            haystack_copies=copies,
            needle_depth=at / n if n else 0.0,
        )


def _normalize(text: str) -> str:
    text = re.sub(r"(?<=\d)[,_](?=\d{3}\b)", "", text.casefold())
    return " ".join(re.findall(r"\w+", text))


def answer_key(expect: str) -> str:
    """The normalized form of `expect` that `needle_recovered` looks for; rejects one with no words."""
    key = _normalize(expect)
    if not key:
        raise ValueError(f"expect: {expect!r} has no letters or digits to look for")
    return key


def needle_recovered(output: str, expect: str) -> bool:
    """True when `expect` appears in `output` as whole words, ignoring case, punctuation and digit grouping."""
    return f" {answer_key(expect)} " in f" {_normalize(output)} "


def resolve_lengths(
    length: int, fractions: Sequence[float], lengths: Sequence[int] | None = None
) -> list[int]:
    """Sorted, de-duplicated prompt lengths: the explicit `lengths`, else `length` times each fraction."""
    if lengths:
        bad = [x for x in lengths if x <= 0]
        if bad:
            raise ValueError(f"lengths must be positive token counts, got {bad}")
        return sorted(set(lengths))
    if length <= 0:
        raise ValueError(f"length must be a positive token count, got {length}")
    bad = [f for f in fractions if not 0.0 < f <= 1.0]
    if bad or not fractions:
        raise ValueError(f"fractions must be in (0, 1], got {bad or 'none'}")
    return sorted({max(1, round(length * f)) for f in fractions})


@dataclass
class Sample:
    """One timed prefill."""

    prefill_ms: float
    attn_ms: float
    density: float
    timings: dict[str, float]


@dataclass
class Measurement:
    """All timed prefills of one (method, length), plus the needle answer when asked."""

    method: str
    length: int
    samples: list[Sample] = field(default_factory=list)
    answer: str | None = None
    needle_found: bool | None = None
    peaks: list[dict] = field(default_factory=list)  # per GPU: peak allocated/reserved MiB over these prefills


def run_benchmark(
    runner: Any,
    prompts: dict[int, NiahPrompt],
    methods: Sequence[str],
    repeats: int,
    warmup: int = 1,
    answer_tokens: int = 0,
    expect: str = DEFAULT_EXPECT,
    console: Console | None = None,
) -> list[Measurement]:
    """Time `repeats` prefills per method and length, each after `warmup` untimed ones, in one process.

    Methods take turns at every length, in alternating order (A B, then B A, ...) so that neither always runs
    first. A method switch re-uploads SALE's thresholds, so every switch is followed by that method's warm-up
    and no timed prefill pays for it. With `answer_tokens` > 0 each method also generates that many tokens
    and the answer is checked for `expect`.
    """
    import torch

    from sale_cli.eval.common import oom_as_user_error
    from sale_cli.memory_plan import measured_peaks, reset_peaks

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be 0 or more, got {warmup}")
    found = {(m, n): Measurement(m, n) for n in prompts for m in methods}
    total = len(prompts) * len(methods) * (warmup + repeats + (1 if answer_tokens > 0 else 0))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("prefill", total=total)
        for i, (n, prompt) in enumerate(prompts.items()):
            input_ids = torch.tensor([prompt.input_ids], dtype=torch.long)
            for method in methods if i % 2 == 0 else methods[::-1]:
                _use(runner, method)
                measurement = found[(method, n)]
                reset_peaks()
                with oom_as_user_error(runner, n, f"in the {method} prefill"):
                    for step in range(warmup + repeats):
                        stage = "warm-up" if step < warmup else f"repeat {step - warmup + 1}/{repeats}"
                        progress.update(task, description=f"{n} tokens · {method} · {stage}")
                        res = runner.prefill(input_ids)
                        if step >= warmup:
                            measurement.samples.append(
                                Sample(res.prefill_ms, res.attn_ms, res.density, dict(res.timings))
                            )
                        progress.advance(task)
                    if method == "sale" and runner.sale_backend == "cuda":
                        # one more prefill for the quant/select/compute split: the kernel synchronizes after each
                        # stage then, so these times stay out of the timed repeats
                        with runner.stage_timings():
                            split = runner.prefill(input_ids).timings
                        for sample in measurement.samples:
                            sample.timings.update(split)
                    if answer_tokens > 0:
                        progress.update(task, description=f"{n} tokens · {method} · answer")
                        out = runner.generate(input_ids, max_new_tokens=answer_tokens)
                        measurement.answer = out.text
                        measurement.needle_found = needle_recovered(out.text, expect)
                        progress.advance(task)
                measurement.peaks = measured_peaks()
    return list(found.values())


def _use(runner: Any, method: str) -> None:
    """Switch the runner to `method`; "sale" keeps the thresholds it loaded."""
    if runner.method != method:
        runner.set_method(method)


def environment(runner: Any) -> dict[str, Any]:
    """Model, device, backends and software/hardware versions of this run."""
    import torch
    import transformers

    device = torch.device(runner.device)
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    return {
        "model": runner.model_name,
        "device": str(device),
        "dtype": str(runner.model.dtype).removeprefix("torch."),
        "gpu": gpus[device.index or 0] if device.type == "cuda" and gpus else None,
        "gpus": gpus,
        "dense_backend": runner.dense_backend,
        "sale_backend": runner.sale_backend,
        **software_versions(),
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
    }


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def summarize(
    measurements: Sequence[Measurement], prompts: dict[int, NiahPrompt], env: dict[str, Any]
) -> list[dict[str, Any]]:
    """One record per (method, length): medians, the quant/select/compute split, speedups vs dense.

    `overhead_pct` is quantization plus selection as a share of the three stages (None when not reported).
    """
    records = []
    for m in measurements:
        if not m.samples:
            raise ValueError(f"no timed prefills for method {m.method!r} at length {m.length}")
        split = {
            key: _median([s.timings[key] for s in m.samples])
            for key in SPLIT_KEYS
            if all(key in s.timings for s in m.samples)
        }
        estimate = split.get("quant", 0.0) + split.get("select", 0.0)
        split_total = sum(split.values())
        prompt = prompts[m.length]
        records.append(
            {
                "method": m.method,
                "length": m.length,
                "input_tokens": len(prompt.input_ids),
                "prefill_ms": _median([s.prefill_ms for s in m.samples]),
                "attn_ms": _median([s.attn_ms for s in m.samples]),
                "density": _median([s.density for s in m.samples]),
                "backend": env["dense_backend"] if m.method == "dense" else env["sale_backend"],
                "device": env["device"],
                "gpu": env["gpu"],
                "torch": env["torch"],
                "cuda": env["cuda"],
                **{f"{key}_ms": split.get(key) for key in SPLIT_KEYS},
                "overhead_pct": 100.0 * estimate / split_total if split_total > 0 else None,
                "attn_speedup": None,
                "prefill_speedup": None,
                "repeats": len(m.samples),
                "prefill_ms_runs": [s.prefill_ms for s in m.samples],
                "attn_ms_runs": [s.attn_ms for s in m.samples],
                "needle_position": prompt.needle_start,
                "needle_depth": prompt.needle_depth,
                "haystack_copies": prompt.haystack_copies,
                "answer": m.answer,
                "needle_found": m.needle_found,
                "peak_mib": max((p["peak_allocated_mib"] for p in m.peaks), default=None),
                "peak_mib_per_gpu": [p["peak_allocated_mib"] for p in m.peaks] or None,
                "peak_reserved_mib_per_gpu": [p["peak_reserved_mib"] for p in m.peaks] or None,
            }
        )
    dense = {r["length"]: r for r in records if r["method"] == "dense"}
    for r in records:
        base = dense.get(r["length"])
        if base is not None:
            r["attn_speedup"] = base["attn_ms"] / r["attn_ms"] if r["attn_ms"] > 0 else None
            r["prefill_speedup"] = base["prefill_ms"] / r["prefill_ms"] if r["prefill_ms"] > 0 else None
    return records


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table_title(env: dict[str, Any], methods: Sequence[str]) -> str:
    """Model, hardware and backends; warns when SALE runs the reference backend."""
    where = f"{env['gpu']} ({env['device']})" if env["gpu"] else env["device"]
    title = f"NIAH prefill latency · {env['model']} · {where}"
    if "dense" in methods:
        title += f" · dense: {env['dense_backend']}"
    if "sale" in methods:
        title += f" · SALE: {env['sale_backend']}"
        if env["sale_backend"] != "cuda":
            title += " (reference backend, no CUDA kernel: SALE timings do not show the kernel's speed)"
    return title


def latency_table(records: Sequence[dict[str, Any]], env: dict[str, Any]) -> Table:
    """The Rich table of the records, one row per (length, method)."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    answers = any(r["needle_found"] is not None for r in records)
    table = Table(
        title=table_title(env, methods), box=box.SIMPLE_HEAVY, pad_edge=False, collapse_padding=True
    )
    table.add_column("Length", justify="right")
    table.add_column("Method")
    for name in (
        "Prefill\nms",
        "Attn\nms",
        "Attn\nspeedup",
        "Prefill\nspeedup",
        "Density",
        "Overhead\n%",
    ):
        table.add_column(name, justify="right")
    peaks = any(r.get("peak_mib_per_gpu") for r in records)
    if peaks:
        table.add_column("Peak GiB\nper GPU", justify="right")
    if answers:
        table.add_column("Needle", justify="center")
    for r in sorted(records, key=lambda r: (r["length"], methods.index(r["method"]))):
        row = [
            _tokens(r["length"]),
            r["method"],
            _fmt(r["prefill_ms"], ".1f"),
            _fmt(r["attn_ms"], ".1f"),
            _fmt(r["attn_speedup"], ".2f", "x"),
            _fmt(r["prefill_speedup"], ".2f", "x"),
            _fmt(r["density"], ".3f"),
            _fmt(r["overhead_pct"], ".1f"),
        ]
        if peaks:
            row.append("/".join(f"{x / 1024:.1f}" for x in r.get("peak_mib_per_gpu") or []) or "-")
        if answers:
            row.append({True: "[green]found[/]", False: "[red]missed[/]", None: "-"}[r["needle_found"]])
        table.add_row(*row)
    return table


CONFIG_PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "vocab_size": 128256,
        "dtype": "bfloat16",
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "dtype": "float32",
    },
}
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(text: str, vocab_size: int = 2048) -> Any:
    """A byte-level BPE tokenizer with BOS/EOS/PAD and a small chat template, trained on `text` (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def write_config_dir(path: str | os.PathLike, preset: str = "llama-3.1-8b", vocab_size: int = 2048) -> Any:
    """Write config.json of a Llama `preset` and a tokenizer trained on the bundled haystack into `path`.

    The directory holds no weights: it is for timing runs that build the model with random weights (the
    architecture, not the weights, sets the prefill cost). Presets: see `CONFIG_PRESETS`. Returns the config.
    """
    from transformers import LlamaConfig

    if preset not in CONFIG_PRESETS:
        raise ValueError(f"preset {preset!r} is unknown; choose one of {sorted(CONFIG_PRESETS)}")
    tokenizer = train_tokenizer(load_haystack(), vocab_size)
    kwargs = {"vocab_size": len(tokenizer), **CONFIG_PRESETS[preset]}
    config = LlamaConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **kwargs,
    )
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return config
