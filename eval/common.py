"""Pieces shared by the benchmark tasks: data-parallel ranks, resumable prediction files, the generation loop."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sale_cli.errors import UserError


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename, so readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are meant to be shared
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


def check_writable_dir(folder: Path, option: str) -> None:
    """Fail before any work when files cannot be created in `folder` (made later if missing)."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:  # the folders still to be made
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option}: cannot create {folder}: {existing} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UserError(f"{option}: cannot write to {existing} ({exc.strerror or exc}); choose another place") from exc


def check_writable(path: Path, option: str) -> None:
    """Fail before any work when the file `path` cannot be written."""
    if Path(path).is_dir():
        raise UserError(f"{option}: {path} is a folder; give a file path")
    check_writable_dir(Path(path).parent, option)


def read_json(path: Path) -> Any:
    """A JSON file's value; UserError naming the file and line when it is not UTF-8 JSON (a UTF-8 BOM is fine)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text; save it as UTF-8") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno}); "
                        "was it cut short or edited?") from exc


def read_jsonl(path: Path, required: Sequence[str] = (), torn_tail: bool = False) -> list[dict]:
    """The records of a JSONL file: one JSON object a line, UTF-8 (a leading BOM is fine).

    UserError naming the file and line for a line that is not UTF-8, not JSON, not an object or lacks a
    `required` field. With `torn_tail`, a last line without its newline (a write cut short) is ignored.
    """
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if torn_tail and not raw.endswith(b"\n"):
                break
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}:{number}: not UTF-8 text; save the file as UTF-8") from exc
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno})") from exc
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: expected a JSON object {{...}}, got {type(record).__name__}")
            missing = [k for k in required if k not in record]
            if missing:
                raise UserError(f"{path}:{number}: the record lacks {', '.join(repr(k) for k in missing)} "
                                "(every record of the official files has it)")
            records.append(record)
    return records


def _every_line(path: Path) -> list[dict]:
    """Every record of a JSONL file, as the official scorers read it: blank lines skipped, a last line without
    a newline kept when it parses; only a last line that does not (cut short by an interruption) is ignored."""
    if not path.exists():
        return []
    try:
        return read_jsonl(path)
    except UserError:
        return read_jsonl(path, torn_tail=True)  # drops a torn last line; any other bad line raises again


def _complete_lines(path: Path) -> list[dict]:
    """Records of a JSONL file; a last line cut short by an interruption is ignored."""
    if not path.exists():
        return []
    return read_jsonl(path, torn_tail=True)


def experiment_dir(results_dir: Path, exp: str, option: str = "--exp") -> Path:
    """RESULTS_DIR/EXP, for an experiment name that is one plain folder name (nothing outside RESULTS_DIR)."""
    if not exp.strip() or exp in (".", "..") or "/" in exp or "\\" in exp or os.path.isabs(exp):
        raise UserError(f"{option}: {exp!r} is not an experiment name; use a plain folder name such as "
                        f"'dense-8b' (results go to {results_dir}/<name>/)")
    return results_dir / exp


@contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` for one run, so that a second run on it is refused.

    An OS lock (flock) on `folder/.lock`: the OS drops it when the holder ends, even when killed. Under torchrun
    rank 0 takes it for the whole run and tells the other ranks whether it got it.
    """
    import fcntl

    rank, world = rank_world()
    fd, holder = None, None
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except BlockingIOError:  # held by another process
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            fd = None
    if world > 1:
        import torch.distributed as dist

        shared = [holder]
        dist.broadcast_object_list(shared, src=0)
        holder = shared[0]
    if holder is not None:
        raise UserError(f"{folder} is in use by another run ({holder}); wait for it to end, or use another --exp")
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


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

    def every_record(self) -> list[dict]:
        """Every record of the main file and then its shards, repeats kept: what an official scorer counts."""
        return [rec for file in [self.path, *self.shards()] for rec in _every_line(file)]

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


def _has_predictions(bench_dir: Path) -> bool:
    """Whether any prediction file in `bench_dir` holds a complete record."""
    for file in bench_dir.glob("*.jsonl"):
        with open(file, "rb") as f:
            if f.readline().endswith(b"\n"):
                return True
    return False


def check_run_config(bench_dir: Path, config: dict) -> None:
    """Record what produced the predictions in `bench_dir`; refuse to mix them with another configuration."""
    path = bench_dir / "run.json"
    if path.exists():
        old = read_json(path)
        old = old if isinstance(old, dict) else {}
        diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
        if diff and not _has_predictions(bench_dir):  # a run that failed before its first prediction
            if rank_world()[0] == 0:
                atomic_write_json(path, config)
        elif diff:
            detail = "; ".join(f"{k}: {a!r} before, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"--exp: {bench_dir} holds predictions of another configuration ({detail}); "
                             "use a new --exp name or remove that folder")
    elif rank_world()[0] == 0:
        atomic_write_json(path, config)


@dataclass(frozen=True)
class Scored:
    """A score together with counts (by reason) of the samples scored by a documented choice of ours."""

    score: float
    warnings: dict[str, int]


RESULT_METADATA = ("scorer", "warnings")  # result.json entries that are not scores


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark keeps its predictions under an experiment, and how a file of them is scored.

    `score_records(name, records, **score_options)` gives a float or a `Scored`; the options (e.g. the scorer)
    and, for a `Scored` benchmark, the warnings are written into result.json beside the scores."""

    name: str
    names: list[str]
    filename: str
    key: str
    option: str
    score_records: Callable[..., float | Scored]
    score_options: dict[str, Any] = field(default_factory=dict)

    def predictions(self, exp_dir: Path, name: str) -> PredictionFile:
        return PredictionFile(exp_dir / self.name / self.filename.format(name), self.key)

    def consolidate(self, exp_dir: Path) -> None:
        """Fold the rank files of a data-parallel run into the main prediction files."""
        for name in self.names:
            self.predictions(exp_dir, name).consolidate()

    def available(self, exp_dir: Path) -> list[str]:
        """Names with predictions in `exp_dir`, in the official order."""
        return [n for n in self.names if self.predictions(exp_dir, n).records()]

    def read_result(self, exp_dir: Path) -> dict[str, float]:
        """The scores in `<name>/result.json`; UserError naming the file when it is not one this tool writes."""
        path = exp_dir / self.name / "result.json"
        data = read_json(path)
        known = {*self.names, "average"}
        if not isinstance(data, dict) or "average" not in data:
            problem = "no 'average' score"
        else:  # what score() records beside the scores (the scorer, its warnings) is not a score
            data = {k: v for k, v in data.items() if k not in RESULT_METADATA}
            bad = [k for k, v in data.items()
                   if k not in known or isinstance(v, bool) or not isinstance(v, (int, float))]
            problem = f"unexpected entries {', '.join(map(repr, bad[:3]))}" if bad else ""
        if problem:
            raise UserError(f"{path}: {problem}; rescore with `sale {self.name} --exp {exp_dir.name} --eval-only`")
        return data

    def score(self, exp_dir: Path, names: list[str] | None = None, write: bool = True) -> dict[str, float]:
        """Official score of each name's predictions plus their `average`, written to `<name>/result.json`."""
        names = self.available(exp_dir) if names is None else names
        if not names:
            raise FileNotFoundError(f"--exp: no {self.name} predictions under {exp_dir / self.name}")
        result: dict[str, float] = {}
        warnings: dict[str, dict[str, int]] | None = None
        for name in names:
            records = self.predictions(exp_dir, name).every_record()
            if not records:
                raise FileNotFoundError(f"{self.option}: no predictions for {name} in {exp_dir / self.name}")
            value = self.score_records(name, records, **self.score_options)
            if isinstance(value, Scored):
                warnings = {} if warnings is None else warnings
                if value.warnings:
                    warnings[name] = value.warnings
                value = value.score
            result[name] = value
        result["average"] = round(sum(result.values()) / len(result), 2)
        if write:
            extra = {**self.score_options, **({} if warnings is None else {"warnings": warnings})}
            atomic_write_json(exp_dir / self.name / "result.json", {**result, **extra})
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


def _hub_address() -> tuple[str, int]:
    """(host, port) a hub request connects to first: the HTTPS proxy when one is set, else HF_ENDPOINT."""
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
                   or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the Hugging Face hub (or the proxy); False in offline mode (HF_HUB_OFFLINE)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection(_hub_address(), timeout=timeout).close()
    except OSError:
        return False
    return True


def offline_unless_reachable(model: str) -> None:
    """When `model` would come from the hub (not a local path or the demo alias) and the hub does not answer one
    quick probe, switch huggingface_hub to offline mode: the model then loads from the cache or fails at once
    instead of retrying the hub."""
    from sale_cli import demo_model

    if model == demo_model.ALIAS or model.endswith(".gguf") or Path(model).expanduser().exists():
        return
    if not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True


def fetch_data(path: Path, download: Callable[[], None], explain: str) -> None:
    """Make sure an official data file exists: download it when missing and the hub answers a quick probe;
    otherwise FileNotFoundError saying where to put it (`explain`). Called before any model is loaded."""
    if path.exists():
        return
    if not hub_reachable():
        raise FileNotFoundError(f"{path} is missing and the Hugging Face hub ({_hub_address()[0]}) is not "
                                f"reachable (offline?). {explain}")
    try:
        download()
    except Exception as err:
        raise FileNotFoundError(f"{path} is missing and could not be downloaded "
                                f"({type(err).__name__}: {err}). {explain}") from err
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing after the download. {explain}")


def load_data(path: Path, download: Callable[[], None], explain: str, limit: int | None,
              required: Sequence[str] = ()) -> list[dict]:
    """The records of an official JSONL data file (the first `limit`), downloaded from the hub if missing.

    Every record must have the `required` fields."""
    fetch_data(path, download, explain)
    samples = read_jsonl(path, required)
    if not samples:
        raise UserError(f"{path} is empty: it holds no records (one JSON object a line). {explain}")
    return samples[:limit] if limit else samples


def mean_or_none(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None
