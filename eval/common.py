"""Pieces shared by the benchmark tasks: data-parallel ranks, resumable prediction files, the generation loop."""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import typer


def load_spec(name: str) -> dict:
    """A bundled JSON file from `sale_cli.data/prompts/` (official templates and generation lengths)."""
    return json.loads(resources.files("sale_cli.data").joinpath("prompts").joinpath(name).read_text(encoding="utf-8"))


def software_versions() -> dict[str, Any]:
    """Versions of sale, Python, torch and its CUDA / cuDNN (None without a GPU) for a run's JSON."""
    import platform

    import torch

    from sale_cli import __version__

    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "sale": __version__,
        "python": platform.python_version(),
    }


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


def rank_world() -> tuple[int, int]:
    """This process's rank and the world size; initializes torch.distributed (gloo) under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        from datetime import timedelta

        # ranks meet only at the end of a run, possibly hours apart: a long timeout
        dist.init_process_group(backend="gloo", timeout=timedelta(days=1))
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if rank_world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def finish_ranks() -> None:
    """Tear down torch.distributed if it was set up."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename, so readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def _complete_lines(path: Path) -> list[dict]:
    """Records of a JSONL file; a last line cut short by an interruption is ignored."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]


class PredictionFile:
    """An append-only JSONL file of predictions, one record per sample identified by `key`.

    In a data-parallel run each rank appends to `<stem>.rank<r>.jsonl`; `consolidate` folds those into
    the main file. Readers merge the main file and any shards, keeping the first record of each key.
    """

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key

    def shards(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.stem}.rank*{self.path.suffix}"))

    def records(self) -> list[dict]:
        """All records; keyed ones once each, records without the key (official files lack it) all kept."""
        seen: dict[Any, dict] = {}
        keyless: list[dict] = []
        for file in [self.path, *self.shards()]:
            for rec in _complete_lines(file):
                if self.key in rec:
                    seen.setdefault(rec[self.key], rec)
                else:
                    keyless.append(rec)
        return list(seen.values()) + keyless

    def done(self) -> set:
        return {rec[self.key] for rec in self.records() if self.key in rec}

    def writer(self, rank: int, world: int) -> Callable[[dict], None]:
        """A function appending one record durably to this rank's file (a torn last line is cut first)."""
        target = self.path if world == 1 else self.path.with_name(f"{self.path.stem}.rank{rank}{self.path.suffix}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            data = target.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(target, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)

        def append(record: dict) -> None:
            with open(target, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())

        return append

    def consolidate(self) -> None:
        """Rewrite the main file with all records and remove the rank shards."""
        shards = self.shards()
        if not shards:
            return
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records())
        atomic_write_text(self.path, lines)
        for shard in shards:
            shard.unlink()


def check_run_config(bench_dir: Path, config: dict) -> None:
    """Record what produced the predictions in `bench_dir`; refuse to mix them with another configuration."""
    path = bench_dir / "run.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: {a!r} before, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"--exp: {bench_dir} holds predictions of another configuration ({detail}); "
                             "use a new --exp name or remove that folder")
    elif rank_world()[0] == 0:
        atomic_write_json(path, config)


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark keeps its predictions under an experiment, and how a file of them is scored."""

    name: str
    names: list[str]
    filename: str
    key: str
    option: str
    score_records: Callable[[str, list[dict]], float]

    def predictions(self, exp_dir: Path, name: str) -> PredictionFile:
        return PredictionFile(exp_dir / self.name / self.filename.format(name), self.key)

    def consolidate(self, exp_dir: Path) -> None:
        """Fold the rank files of a data-parallel run into the main prediction files."""
        for name in self.names:
            self.predictions(exp_dir, name).consolidate()

    def available(self, exp_dir: Path) -> list[str]:
        """Names with predictions in `exp_dir`, in the official order."""
        return [n for n in self.names if self.predictions(exp_dir, n).records()]

    def score(self, exp_dir: Path, names: list[str] | None = None, write: bool = True) -> dict[str, float]:
        """Official score of each name's predictions plus their `average`, written to `<name>/result.json`."""
        names = self.available(exp_dir) if names is None else names
        if not names:
            raise FileNotFoundError(f"--exp: no {self.name} predictions under {exp_dir / self.name}")
        result: dict[str, float] = {}
        for name in names:
            records = self.predictions(exp_dir, name).records()
            if not records:
                raise FileNotFoundError(f"{self.option}: no predictions for {name} in {exp_dir / self.name}")
            result[name] = self.score_records(name, records)
        result["average"] = round(sum(result.values()) / len(result), 2)
        if write:
            atomic_write_json(exp_dir / self.name / "result.json", result)
        return result


@dataclass
class Prepared:
    """A sample ready for generation."""

    input_ids: list[int]
    max_new_tokens: int
    stop_on_newline: bool = False
    min_new_tokens: int = 0


def generate_all(runner, samples: list[dict], key: str, out: PredictionFile, prepare: Callable[[dict], Prepared],
                 record: Callable[[dict, Any], dict], label: str) -> None:
    """Generate for this rank's share of the samples not yet in `out`, appending each record as it is done."""
    from rich.progress import track

    lacking = sum(key not in s for s in samples)
    if lacking:
        raise ValueError(f"{label}: {lacking} data records lack the '{key}' field of the official files")
    rank, world = rank_world()
    done = out.done()
    todo = [s for s in samples[rank::world] if s[key] not in done]
    append = out.writer(rank, world)
    for sample in track(todo, description=f"{label} (rank {rank})" if world > 1 else label, disable=not todo):
        p = prepare(sample)
        with oom_as_user_error(runner, len(p.input_ids), f"in {label}, {key} {sample[key]!r}"):  # records kept
            res = runner.generate(p.input_ids, p.max_new_tokens, stop_on_newline=p.stop_on_newline,
                                  min_new_tokens=p.min_new_tokens)
        rec = record(sample, res)
        rec.update(input_tokens=res.input_tokens, attn_ms=res.attn_ms, density=res.density)
        append(rec)


@contextlib.contextmanager
def oom_as_user_error(runner, tokens: int, where: str):
    """Turn a CUDA out of memory inside the block into a UserError of one line: the peak per GPU, the prefill
    chunk and what to change."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        from sale_cli.errors import UserError
        from sale_cli.memory_plan import oom_message

        plan = getattr(runner, "memory_plan", None)
        gpus = len(plan.gpus) if plan is not None else 1
        raise UserError(oom_message(tokens, getattr(runner, "prefill_chunk", None), gpus, where)) from exc


def prompt_budget(runner, max_length: int | None, max_new_tokens: int, chat: bool, option: str) -> int:
    """Tokens left for the prompt: the length limit less the generation and the chat template's own tokens."""
    total = runner.max_context if max_length is None else max_length
    overhead = 0
    if chat:
        empty = runner.apply_chat_template("")
        overhead = len(runner.tokenizer(empty, add_special_tokens=False).input_ids) if empty else 0
    budget = total - max_new_tokens - overhead
    if budget < 2:
        raise ValueError(f"{option}: {total} tokens leave no room for a prompt after {max_new_tokens} new tokens "
                         f"and {overhead} chat-template tokens")
    return budget


def encode_final(runner, prompt: str, chat: bool) -> list[int]:
    """Token ids of the prompt, chat-formatted when asked (the template then carries the special tokens)."""
    if chat:
        templated = runner.apply_chat_template(prompt)
        if templated != prompt:
            return runner.tokenizer(templated, add_special_tokens=False).input_ids
    return runner.tokenizer(prompt).input_ids


def load_data(path: Path, download: Callable[[], None], explain: str, limit: int | None) -> list[dict]:
    """The records of an official JSONL data file (the first `limit`), downloaded from the hub if missing."""
    if not path.exists():
        try:
            download()
        except Exception as err:
            raise FileNotFoundError(f"{path} is missing and could not be downloaded "
                                    f"({type(err).__name__}: {err}). {explain}") from err
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing after the download. {explain}")
    with open(path, encoding="utf-8") as f:
        samples = [json.loads(line) for line in f if line.strip()]
    return samples[:limit] if limit else samples


def mean_or_none(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None
