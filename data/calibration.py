"""Calibration and validation text: JSON key-value retrieval, prose passages, code-like text, or the user's files.

Every built-in sample is a pure function of (kind, seed, split). Seeds are namespaced ("sale-calibration/...")
so no sample can coincide with evaluation data or the passkey prompts. Calibration draws seeds 0, 1, 2, ...
of each kind; the held-out check draws seeds VALIDATION_SEED0, VALIDATION_SEED0 + 1, ... (never used for
calibration). Prose passages are also cut from disjoint text: calibration from the first half of the bundled
novel, validation from the second half.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from sale_cli.errors import UserError

INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."
NAMESPACE = "sale-calibration"
KINDS = ("kv", "prose", "code")  # built-in kinds; "mix" cycles over them in this order
DATA_CHOICES = (*KINDS, "mix")
VALIDATION_SEED0 = 1_000_000  # validation seeds start here; calibration seeds stay below
PROSE_SOURCE = "haystack/botchan.txt.gz"
PROSE_TASK = "\n\nSummarize the passage above in a few sentences."
CODE_TASK = "\n\nExplain briefly what the module above does."
MAX_PIECE_CHARS = 200  # text is cut at line and sentence ends; longer runs at spaces

CountTokens = Callable[[str], int]


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _render(pairs: list[tuple[str, str]], key: str) -> str:
    body = json.dumps(dict(pairs), indent=1)
    return f"{INSTRUCTION}\n\nJSON data:\n{body}\n\nKey: \"{key}\"\nCorresponding value:"


def _check_target(target_tokens: int):
    if target_tokens < 64:
        raise ValueError(f"target_tokens must be >= 64, got {target_tokens}")


def _fit_stream(piece: Callable[[int], str], render: Callable[[str], str], target_tokens: int,
                count_tokens: CountTokens) -> str:
    """render(the longest run piece(0) + piece(1) + ... that fits in ``target_tokens``); the stream is endless."""
    pieces: list[str] = []
    n = 64
    while True:  # double until too long, then search between the last two lengths
        pieces += [piece(i) for i in range(len(pieces), n)]
        if count_tokens(render("".join(pieces))) > target_tokens:
            break
        n *= 2
    return render("".join(pieces[:_longest_fit(n, lambda k: render("".join(pieces[:k])), target_tokens,
                                                count_tokens)]))


def _longest_fit(n: int, render: Callable[[int], str], target_tokens: int, count_tokens: CountTokens) -> int:
    """Largest k in [1, n] with count_tokens(render(k)) <= target_tokens (1 when none fits)."""
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(render(mid)) <= target_tokens:
            lo = mid
        else:
            hi = mid - 1
    return lo


def kv_retrieval_sample(seed: int, target_tokens: int, count_tokens: CountTokens,
                        key_position: float = 0.05) -> tuple[str, str]:
    """(prompt, expected value) with as many pairs as fit in ``target_tokens`` by ``count_tokens``.

    The queried key sits at ``key_position`` (fraction of the pairs, default near the start of the context).
    """
    _check_target(target_tokens)
    rng = random.Random(f"{NAMESPACE}/{seed}")
    per_pair = max(1, count_tokens(_render([(_uuid(rng), _uuid(rng)) for _ in range(8)], "x")) // 8)
    pairs = [(_uuid(rng), _uuid(rng)) for _ in range(target_tokens // per_pair + 8)]
    while count_tokens(_render(pairs, pairs[0][0])) <= target_tokens:  # the estimate above counts the instruction
        pairs += [(_uuid(rng), _uuid(rng)) for _ in range(len(pairs) // 8 + 1)]
    n = _longest_fit(len(pairs), lambda k: _render(pairs[:k], pairs[0][0]), target_tokens, count_tokens)
    chosen = pairs[:n]
    key, value = chosen[min(len(chosen) - 1, int(key_position * len(chosen)))]
    return _render(chosen, key), value


# ---------------------------------------------------------------------------------------------------------------
# prose: passages of the bundled public-domain novel (data/haystack/README.md)

_SENTENCE_END = re.compile(r"(?<=[.!?])(?=\s)|(?<=[.!?][\"'’”)])(?=\s)|(?<=\n)")


def _pieces(text: str) -> list[str]:
    """Split at sentence and line ends (longer runs at spaces); the pieces join back to ``text``."""
    out = []
    for piece in _SENTENCE_END.split(text):
        if len(piece) <= MAX_PIECE_CHARS:
            out.append(piece)
            continue
        for word in re.split(r"(?<=\s)", piece):  # a long run-on: cut at spaces, and long words every N chars
            out += [word[i:i + MAX_PIECE_CHARS] for i in range(0, len(word), MAX_PIECE_CHARS)]
    return [p for p in out if p]


@lru_cache(maxsize=1)
def _novel_halves() -> tuple[list[str], list[str]]:
    """The novel's sentences, split into a calibration half and a validation half at a line end."""
    text = gzip.decompress(resources.files("sale_cli.data").joinpath(PROSE_SOURCE).read_bytes()).decode("utf-8")
    middle = re.compile(r"[.!?\"]\n").search(text, len(text) // 2).end()  # a sentence that ends a line
    return _pieces(text[:middle].strip() + "\n\n"), _pieces(text[middle:].strip() + "\n\n")


def prose_sample(seed: int, target_tokens: int, count_tokens: CountTokens, split: str = "calibration") -> str:
    """A passage of the novel (from a seeded sentence on, wrapping within its half) and a summary request."""
    _check_target(target_tokens)
    half = _novel_halves()[_split_index(split)]
    rng = random.Random(f"{NAMESPACE}/prose/{seed}")
    start = rng.randrange(len(half))
    return _fit_stream(lambda i: half[(start + i) % len(half)], lambda t: t.strip() + PROSE_TASK, target_tokens,
                       count_tokens)


def _split_index(split: str) -> int:
    if split not in ("calibration", "validation"):
        raise ValueError(f"split must be 'calibration' or 'validation', got {split!r}")
    return 0 if split == "calibration" else 1


# ---------------------------------------------------------------------------------------------------------------
# code: synthetic Python modules from a seeded generator

_VERBS = ("load", "parse", "compute", "update", "merge", "split", "encode", "decode", "render", "validate", "resolve",
          "collect", "filter", "build", "flush", "scan", "apply", "normalize", "fetch", "store", "rotate", "estimate")
_NOUNS = ("record", "buffer", "config", "token", "segment", "matrix", "index", "header", "payload", "request", "cache",
          "window", "schedule", "sample", "vertex", "ledger", "profile", "channel", "budget", "report", "queue", "block")
_ADJS = ("raw", "sorted", "partial", "cached", "pending", "valid", "remote", "local", "sparse", "dense", "active",
         "stale", "unique", "nested", "signed", "total")
_TYPES = ("int", "float", "str", "bool", "list[int]", "dict[str, int]", "bytes", "tuple[int, int]")
_MODULES = ("os", "re", "json", "math", "time", "heapq", "bisect", "hashlib", "itertools", "functools", "logging",
            "collections", "dataclasses", "pathlib", "struct", "random", "statistics", "typing")
_OPS = ("+", "-", "*", "//", "%")
_CMPS = ("<", ">", "<=", ">=", "==", "!=")


class _CodeGen:
    def __init__(self, rng: random.Random):
        self.r = rng

    def name(self, parts: int = 2) -> str:
        words = [self.r.choice(_VERBS)] + [self.r.choice(_ADJS + _NOUNS) for _ in range(parts - 1)]
        return "_".join(words)

    def var(self) -> str:
        return self.r.choice((self.r.choice(_NOUNS), f"{self.r.choice(_ADJS)}_{self.r.choice(_NOUNS)}"))

    def cls(self) -> str:
        return "".join(w.capitalize() for w in (self.r.choice(_ADJS), self.r.choice(_NOUNS))) + \
            self.r.choice(("", "Manager", "Store", "Parser", "Error", "Builder"))

    def expr(self, names: Sequence[str]) -> str:
        r = self.r
        a = r.choice(names)
        pick = r.randrange(7)
        if pick == 0:
            return f"{a} {r.choice(_OPS)} {r.randint(1, 4096)}"
        if pick == 1:
            return f"len({a}) {r.choice(_OPS)} {r.choice(names)}"
        if pick == 2:
            return f"[x {r.choice(_OPS)} {r.randint(1, 9)} for x in {a} if x {r.choice(_CMPS)} {r.randint(0, 99)}]"
        if pick == 3:
            return f"self.{self.var()}.get({a!s}, {r.randint(0, 9)})" if r.random() < 0.5 else f"{self.name()}({a})"
        if pick == 4:
            return f"f\"{r.choice(_NOUNS)} {{{a}}} is {r.choice(_ADJS)}\""
        if pick == 5:
            return f"{{\"{r.choice(_NOUNS)}\": {a}, \"{r.choice(_NOUNS)}\": {r.random():.4f}}}"
        return f"max({a}, {r.choice(names)})"

    def body(self, names: list[str], depth: int, indent: str) -> list[str]:
        r = self.r
        lines = []
        for _ in range(r.randint(2, 5)):
            pick = r.randrange(10)
            if pick < 3 or depth >= 2:
                new = self.var()
                lines.append(f"{indent}{new} = {self.expr(names)}")
                names = names + [new]
            elif pick == 3:
                lines.append(f"{indent}# {r.choice(_VERBS)} the {r.choice(_ADJS)} {r.choice(_NOUNS)} "
                             f"before the {r.choice(_NOUNS)} is {r.choice(_ADJS)}")
            elif pick in (4, 5):
                item = r.choice(("item", "entry", "row", "node"))
                lines.append(f"{indent}for {item} in {r.choice(names)}:")
                lines += self.body(names + [item], depth + 1, indent + "    ")
            elif pick == 6:
                lines.append(f"{indent}if {r.choice(names)} {r.choice(_CMPS)} {r.randint(0, 512)}:")
                lines += self.body(names, depth + 1, indent + "    ")
                lines.append(f"{indent}else:")
                lines += self.body(names, depth + 1, indent + "    ")
            elif pick == 7:
                lines.append(f"{indent}try:")
                lines += self.body(names, depth + 1, indent + "    ")
                lines.append(f"{indent}except {r.choice(('KeyError', 'ValueError', 'OSError'))} as exc:")
                lines.append(f"{indent}    raise {self.cls()}(f\"cannot {r.choice(_VERBS)} {{exc}}\") from exc")
            elif pick == 8:
                lines.append(f"{indent}logger.debug(\"%s: %d\", {r.choice(names)!s}, {r.randint(0, 99)})")
            else:
                lines.append(f"{indent}while {r.choice(names)} {r.choice(_CMPS)} {r.randint(1, 64)}:")
                lines.append(f"{indent}    {r.choice(names)} = {self.expr(names)}")
                lines.append(f"{indent}    break")
        lines.append(f"{indent}return {r.choice(names)}")
        return lines

    def function(self, indent: str = "", method: bool = False) -> list[str]:
        r = self.r
        args = list(dict.fromkeys(self.var() for _ in range(r.randint(1, 4))))
        sig = ", ".join((["self"] if method else []) + [f"{a}: {r.choice(_TYPES)}" for a in args])
        name = self.name(r.randint(2, 3))
        lines = [f"{indent}def {name}({sig}) -> {r.choice(_TYPES)}:",
                 f"{indent}    \"\"\"{name.replace('_', ' ').capitalize()} of the {r.choice(_ADJS)} "
                 f"{r.choice(_NOUNS)}s.", ""]
        for a in args:
            lines.append(f"{indent}    {a}: the {r.choice(_ADJS)} {r.choice(_NOUNS)} to {r.choice(_VERBS)}.")
        lines.append(f"{indent}    \"\"\"")
        return lines + self.body(args, 0, indent + "    ") + [""]

    def klass(self) -> list[str]:
        r = self.r
        name = self.cls()
        fields = list(dict.fromkeys(self.var() for _ in range(r.randint(2, 4))))
        lines = ["@dataclass", f"class {name}:", f"    \"\"\"A {r.choice(_ADJS)} {r.choice(_NOUNS)} of "
                 f"{r.choice(_NOUNS)}s, {r.choice(_VERBS)}d on demand.\"\"\"", ""]
        lines += [f"    {f}: {r.choice(_TYPES)} = {r.choice(('0', 'None', 'field(default_factory=list)'))}"
                  for f in fields] + [""]
        for _ in range(r.randint(1, 3)):
            lines += self.function("    ", method=True)
        return lines + [""]

    def module(self) -> list[str]:
        r = self.r
        lines = [f"\"\"\"{self.name().replace('_', ' ').capitalize()} for the {r.choice(_NOUNS)} service.\"\"\"", ""]
        lines += [f"import {m}" for m in sorted(r.sample(_MODULES, r.randint(2, 6)))]
        lines += ["from dataclasses import dataclass, field", "", "logger = logging.getLogger(__name__)",
                  f"{r.choice(_NOUNS).upper()}_LIMIT = {r.randint(8, 65536)}", "", ""]
        for _ in range(r.randint(3, 8)):
            lines += self.klass() if r.random() < 0.35 else self.function() + [""]
        return lines


def code_sample(seed: int, target_tokens: int, count_tokens: CountTokens) -> str:
    """Synthetic Python modules (one after another) cut at a line end, and a request to explain them."""
    _check_target(target_tokens)
    gen = _CodeGen(random.Random(f"{NAMESPACE}/code/{seed}"))
    lines: list[str] = []

    def line(i: int) -> str:
        while len(lines) <= i:
            lines.extend([f"# ---- module {len(lines)} ----", *gen.module()])
        return lines[i] + "\n"

    return _fit_stream(line, lambda t: t.rstrip("\n") + CODE_TASK, target_tokens, count_tokens)


# ---------------------------------------------------------------------------------------------------------------
# the user's own text


def read_user_documents(path: str | Path) -> list[tuple[str, str]]:
    """(name, text) of every document: a .txt file is one, every line of a .jsonl file with a "text" field is one.

    ``path`` is a file or a folder (its .txt and .jsonl files, recursively, in sorted order).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise UserError(f"--data {path}: the folder holds no .txt or .jsonl files")
    elif path.is_file():
        if path.suffix not in (".txt", ".jsonl"):
            raise UserError(f"--data {path}: expected a .txt or .jsonl file (or one of {', '.join(DATA_CHOICES)})")
        files = [path]
    else:
        raise UserError(f"--data {path}: no such file or folder; use one of {', '.join(DATA_CHOICES)}, "
                        "or a .txt / .jsonl file or a folder of them")
    docs = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--data {file}: cannot read it as UTF-8 text ({exc})") from exc
        if file.suffix == ".txt":
            docs.append((str(file), text))
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"--data {file}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"--data {file}:{lineno}: each line must be a JSON object with a string \"text\" field")
            docs.append((f"{file}:{lineno}", record["text"]))
    if not docs:
        raise UserError(f"--data {path}: no documents found (empty files)")
    return docs


def user_sample(doc: tuple[str, str], target_tokens: int, count_tokens: CountTokens) -> str:
    """The longest start of the document within ``target_tokens``; UserError when the whole is shorter."""
    name, text = doc
    have = count_tokens(text)
    if have < target_tokens:
        raise UserError(f"--data {name}: {have} tokens, fewer than --tokens {target_tokens}; "
                        "pass longer documents or a smaller --tokens")
    pieces = _pieces(text)
    return "".join(pieces[:_longest_fit(len(pieces), lambda k: "".join(pieces[:k]), target_tokens, count_tokens)])


# ---------------------------------------------------------------------------------------------------------------
# the plan: which sample comes when


@dataclass(frozen=True)
class Sample:
    kind: str  # kv, prose, code, or "file"
    seed: int  # the kind's seed (for "file": the document's index)
    text: str

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.seed}"


class CalibrationData:
    """The samples of ``sale calibrate --data`` (a kind, "mix", or a path) in order; sample i is fixed."""

    def __init__(self, data: str = "mix"):
        self.data = data
        self.documents: list[tuple[str, str]] | None = None
        if data not in DATA_CHOICES:
            looks_like_path = any(c in data for c in "/\\.") or Path(data).exists()
            if not looks_like_path:
                raise UserError(f"--data {data!r}: unknown kind; use one of {', '.join(DATA_CHOICES)}, "
                                "or a .txt / .jsonl file or a folder of them")
            self.documents = read_user_documents(data)

    def plan(self, index: int) -> tuple[str, int]:
        """(kind, seed) of calibration sample ``index``."""
        if self.documents is not None:
            return "file", index % len(self.documents)
        if self.data == "mix":
            return KINDS[index % len(KINDS)], index // len(KINDS)
        return self.data, index

    def sample(self, index: int, target_tokens: int, count_tokens: CountTokens) -> Sample:
        kind, seed = self.plan(index)
        if seed >= VALIDATION_SEED0:
            raise ValueError(f"calibration seeds stay below {VALIDATION_SEED0} (validation seeds start there)")
        if kind == "file":
            return Sample(kind, seed, user_sample(self.documents[seed], target_tokens, count_tokens))
        return Sample(kind, seed, builtin_sample(kind, seed, target_tokens, count_tokens, "calibration"))

    def labels(self, samples: int) -> str:
        """"kv:0,prose:0,code:0,..." for the thresholds metadata."""
        return ",".join("{}:{}".format(*self.plan(i)) for i in range(samples))


def builtin_sample(kind: str, seed: int, target_tokens: int, count_tokens: CountTokens,
                   split: str = "calibration") -> str:
    """The text of one built-in sample (kv prompts do not depend on ``split``: their seeds keep them apart)."""
    if kind == "kv":
        return kv_retrieval_sample(seed, target_tokens, count_tokens)[0]
    if kind == "prose":
        return prose_sample(seed, target_tokens, count_tokens, split)
    if kind == "code":
        return code_sample(seed, target_tokens, count_tokens)
    raise ValueError(f"unknown built-in kind {kind!r}; expected one of {KINDS}")


def validation_samples(per_kind: int, target_tokens: int, count_tokens: CountTokens) -> list[Sample]:
    """``per_kind`` held-out samples of each built-in kind, seeds VALIDATION_SEED0 + i (never calibrated on)."""
    if per_kind < 1:
        raise UserError(f"--validate must be >= 1, got {per_kind}")
    return [Sample(kind, VALIDATION_SEED0 + i,
                   builtin_sample(kind, VALIDATION_SEED0 + i, target_tokens, count_tokens, "validation"))
            for kind in KINDS for i in range(per_kind)]
