"""User-facing errors: raised anywhere below the CLI, printed by the CLI as one or two lines (no traceback)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad option, missing or malformed file): the message says what and how.

    Library code may raise ValueError instead; the CLI layer prints either without a traceback unless --debug
    (or SALE_DEBUG=1) is set.
    """


class ModelLoadError(UserError, RuntimeError):
    """A model that cannot be loaded (unknown hub id, hub unreachable, broken checkpoint, bad GGUF)."""
