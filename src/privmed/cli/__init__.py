"""``privmed`` command line: thin wrappers that parse, call the library, print."""

from privmed.cli import (  # noqa: F401  (registers commands)
    audit_cmds,
    data_cmds,
    deid_cmds,
    fed_cmds,
    he_cmds,
    ledger_cmds,
    tabular_cmds,
    train_cmds,
)
from privmed.cli.app import app, main

__all__ = ["app", "main"]
