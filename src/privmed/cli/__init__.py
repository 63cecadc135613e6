"""``privmed`` command line: thin wrappers that parse, call the library, print."""

from privmed.cli import data_cmds, ledger_cmds, train_cmds  # noqa: F401  (registers commands)
from privmed.cli.app import app, main

__all__ = ["app", "main"]
