"""Errors in what the user gave us (config, data files), as opposed to bugs in diet_jax.

`diet_jax.main` prints a `UserError` as one line and exits with status 2; any other exception
keeps its traceback, because it is ours to fix. Each class also derives from the built-in error
that code (and tests) already catch, so raising one instead of a ValueError changes nothing else.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message alone says what to change (the key, file or line)."""


class ConfigError(UserError, ValueError):
    """A config key with an unknown name or a value out of range."""


class DataError(UserError, ValueError):
    """A raw data file that is malformed, empty, or does not fill the configured stages."""


class MissingDataError(UserError, FileNotFoundError):
    """A raw data file or folder that is not where the config says."""


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (a KeyError's quoting and `\\n` escapes undone)."""
    msg = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    return " ".join(msg.split())
