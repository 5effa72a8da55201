"""User-facing errors. Only the CLI turns them into a paragraph and an exit code.

`UsageError` (and its subclass `ConfigError`) exit with 2: the user asked for something wrong.
`RunError` exits with 1: the request was fine but the run failed (NaN loss, corrupt cache, ...).
"""

from __future__ import annotations


class SaecliError(Exception):
    """Base class: the message is already a readable paragraph."""

    exit_code = 1


class UsageError(SaecliError):
    """A bad command line, path or value: exit code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A problem in an experiment file, naming the file and the key path."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file = file
        self.key = key
        where = []
        if file:
            where.append(str(file))
        if key:
            where.append(f"key `{key}`")
        prefix = f"{': '.join(where)}: " if where else ""
        super().__init__(prefix + message)


class SaecliWarning(UserWarning):
    """Something the user should know that does not stop the command; the CLI prints it as a warning."""


class RunError(SaecliError):
    """A runtime failure (diverged loss, corrupt cache, unreachable store): exit code 1."""

    exit_code = 1
