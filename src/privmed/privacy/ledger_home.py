"""Where privmed keeps privacy ledgers unless told otherwise: one per-user folder.

A budget belongs to the data, not to a run folder: a ledger inside ``--out`` would give
every new ``--out`` a fresh budget. So the ledger that privmed keeps itself (for the
sites of ``federate`` and ``simulate``) lives in one per-user folder,
``$XDG_DATA_HOME/privmed/ledgers``, or ``~/.local/share/privmed/ledgers`` when
XDG_DATA_HOME is unset (the XDG Base Directory specification); ``--ledger-dir`` chooses
another folder. The folder holds one ledger file, ``ledger.sqlite``, shared by every
site: the ledger charges the records (images, patients) a run touches, so a file that
is re-exported, shrunk or grown finds its records' spend there (one file per dataset id,
as earlier versions kept, would give it a fresh one; those files are imported once).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from privmed.errors import ConfigError

#: The ledger file of a ledger folder.
LEDGER_NAME = "ledger.sqlite"
# Earlier versions' per-dataset ledgers: <dataset id>.sqlite.
_PER_DATASET = re.compile(r"[0-9a-f]{16}\.sqlite")


def default_ledger_dir() -> Path:
    """``$XDG_DATA_HOME/privmed/ledgers``, else ``~/.local/share/privmed/ledgers``."""
    base = os.environ.get("XDG_DATA_HOME", "")
    # The specification says to ignore a relative value.
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "share"
    return root / "privmed" / "ledgers"


def _folder(ledger_dir: str | os.PathLike[str] | None) -> Path:
    directory = Path(ledger_dir) if ledger_dir is not None else default_ledger_dir()
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"The ledger folder {directory} is a file; give a folder.")
    return directory


def ledger_file(ledger_dir: str | os.PathLike[str] | None = None) -> Path:
    """The ledger file of ``ledger_dir`` (default: the per-user folder)."""
    return _folder(ledger_dir) / LEDGER_NAME


def ledger_for(dataset_id: str, ledger_dir: str | os.PathLike[str] | None = None) -> Path:
    """The ledger that charges the dataset ``dataset_id`` in ``ledger_dir``: the folder's
    one file (:func:`ledger_file`), whatever the dataset; kept for earlier callers."""
    return ledger_file(ledger_dir)


def private_ledger_dir(ledger_dir: str | os.PathLike[str] | None = None) -> Path:
    """``ledger_dir`` (default: the per-user folder), created readable by its owner only:
    beside the ledger, nodes keep their released replies (``LEDGER.rounds/``)."""
    directory = Path(ledger_dir) if ledger_dir is not None else default_ledger_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise ConfigError(f"Cannot create the ledger folder {directory}: "
                          f"{e.strerror or e}.") from None
    if not directory.is_dir():
        raise ConfigError(f"The ledger folder {directory} is a file; give a folder.")
    return directory


def shared_ledger(ledger_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder's ledger file, the folder created private, with earlier versions'
    per-dataset ledgers (``<dataset id>.sqlite``) imported into it once: each is then
    renamed ``<dataset id>.sqlite.imported`` and its nodes' stored replies
    (``<dataset id>.sqlite.rounds/JOB/``) move to ``ledger.sqlite.rounds/<dataset id>/JOB/``,
    where a node on that dataset looks for them."""
    from privmed.privacy.ledger import BudgetLedger

    directory = private_ledger_dir(ledger_dir)
    path = directory / LEDGER_NAME
    legacy = sorted(p for p in directory.iterdir()
                    if _PER_DATASET.fullmatch(p.name) and p.is_file())
    if legacy:
        book = BudgetLedger(path)
        for old in legacy:
            book.import_ledger(old)
            rounds = old.with_name(old.name + ".rounds")
            target = directory / f"{LEDGER_NAME}.rounds" / old.name.removesuffix(".sqlite")
            try:
                if rounds.is_dir() and not target.exists():
                    target.parent.mkdir(mode=0o700, exist_ok=True)
                    rounds.rename(target)
                for suffix in ("-wal", "-shm", ""):  # the file last: it marks the import
                    part = old.with_name(old.name + suffix)
                    if part.exists():
                        part.rename(old.with_name(f"{old.name}.imported{suffix}"))
            except FileNotFoundError:
                pass  # another job imported it at the same time (imports are idempotent)
    return path
