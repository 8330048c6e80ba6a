"""User-facing errors: raised anywhere below the CLI, printed by the CLI as one or two lines (no traceback)."""

from __future__ import annotations

import os

_debug = {"on": False}  # set by the CLI's --debug for the current invocation


def debug_enabled() -> bool:
    """Whether errors should show their full traceback: --debug, or SALE_DEBUG set (and not 0)."""
    return _debug["on"] or os.environ.get("SALE_DEBUG", "") not in ("", "0")


def set_debug(on: bool) -> None:
    _debug["on"] = on


class UserError(Exception):
    """A mistake the user can fix (bad option, missing or malformed file): the message says what and how.

    Library code may raise ValueError instead; the CLI layer prints either without a traceback unless --debug
    (or SALE_DEBUG=1) is set.
    """


class ModelLoadError(UserError, RuntimeError):
    """A model that cannot be loaded (unknown hub id, hub unreachable, broken checkpoint, bad GGUF)."""
