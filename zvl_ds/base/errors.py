"""The base class of every error that a user's input can cause.

A `UserError` says what is wrong and where (a config key, a file, a shard, a CSV row), so the message alone is
enough to fix the input: entry points print it without a traceback and exit with code 2. Anything else that
escapes is a bug in zvl_ds (or a fault of the machine) and keeps its traceback.

Specific errors derive from it and, where they already did, from the built-in type callers catch
(`ConfigError` is still a `ValueError`), so no existing `except` clause changes meaning.
"""
from __future__ import annotations

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """Bad input from the user: a config, a path, a data file, a checkpoint. Message + exit code 2."""


class ConfigError(UserError, ValueError):
    """A config problem the user must fix; the message names the key path (``zvl_ds.config`` raises it, and every
    room that checks a config value)."""
