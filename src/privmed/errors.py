"""User-facing errors.

Every exception here carries one clear sentence meant for a person; the CLI
prints ``str(error)`` and exits with :attr:`PrivmedError.exit_code`, never a
traceback.
"""

from __future__ import annotations


class PrivmedError(Exception):
    """Base class: ``str(self)`` is one sentence a user can act on."""

    exit_code = 1


class DataError(PrivmedError):
    """Input data is missing, corrupt or inconsistent (names the file)."""

    exit_code = 2


class ConfigError(PrivmedError):
    """An option or combination of options cannot be honoured."""

    exit_code = 2


class BudgetExceededError(PrivmedError):
    """A planned privacy spend would exceed the dataset's budget."""

    exit_code = 3


class NetworkError(PrivmedError):
    """A remote resource could not be reached."""

    exit_code = 4
