"""Where privmed keeps privacy ledgers unless told otherwise: one per-user folder.

A budget belongs to the data, not to a run folder: a ledger inside ``--out`` would give
every new ``--out`` a fresh budget. So ledgers that privmed creates itself (one per
federated site) live in one per-user folder, one file per dataset id (the content hash
the ledger keys spends on): ``$XDG_DATA_HOME/privmed/ledgers``, or
``~/.local/share/privmed/ledgers`` when XDG_DATA_HOME is unset (the XDG Base Directory
specification). ``--ledger-dir`` chooses another folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from privmed.errors import ConfigError


def default_ledger_dir() -> Path:
    """``$XDG_DATA_HOME/privmed/ledgers``, else ``~/.local/share/privmed/ledgers``."""
    base = os.environ.get("XDG_DATA_HOME", "")
    # The specification says to ignore a relative value.
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "share"
    return root / "privmed" / "ledgers"


def ledger_for(dataset_id: str, ledger_dir: str | os.PathLike[str] | None = None) -> Path:
    """The ledger file of the dataset ``dataset_id`` in ``ledger_dir`` (default: the
    per-user folder): the same data gets the same ledger, whatever the run folder."""
    directory = Path(ledger_dir) if ledger_dir is not None else default_ledger_dir()
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"The ledger folder {directory} is a file; give a folder.")
    return directory / f"{dataset_id}.sqlite"


def private_ledger_dir(ledger_dir: str | os.PathLike[str] | None = None) -> Path:
    """``ledger_dir`` (default: the per-user folder), created readable by its owner only:
    beside the ledgers, nodes keep their released replies (``LEDGER.rounds/``)."""
    directory = Path(ledger_dir) if ledger_dir is not None else default_ledger_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise ConfigError(f"Cannot create the ledger folder {directory}: "
                          f"{e.strerror or e}.") from None
    if not directory.is_dir():
        raise ConfigError(f"The ledger folder {directory} is a file; give a folder.")
    return directory
