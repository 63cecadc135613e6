"""Each simulated site's ledger, keyed to its data (``federate`` and ``simulate``).

Every site of a local job is charged to one ledger, ``LEDGER_DIR/ledger.sqlite``
(``privacy.ledger_home``: the per-user folder unless ``--ledger-dir`` says otherwise),
which charges the records a site trains on (patients when the data names them, else
images): a second job on the same data finds the budget the first one spent, whatever
its ``--out``, and so does a job on a re-exported, shrunk or grown copy of it. Before any
process starts, every site's whole planned spend is checked against the ledger (the
check the node repeats before each round), so a job that would overspend is refused at
once with the ledger's sentence rather than after every site has refused every round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from privmed.errors import ConfigError
from privmed.federation.config import FederationConfig
from privmed.federation.node.site import SiteNode
from privmed.privacy import BudgetLedger
from privmed.privacy.ledger_home import shared_ledger


@dataclass(frozen=True)
class SiteLedger:
    """One site of a local job: its data file, name, ledger and the budget to set (None:
    keep the one the ledger holds, or no ledger at all for ``--dp none``)."""

    name: str
    data: Path
    ledger: Path | None
    budget_epsilon: float | None


def site_ledgers(site_paths: list[Path], job: FederationConfig, ledger_dir: Path | None,
                 budget_epsilon: float | None, *, check: bool = True,
                 say: Callable[[str], None] | None = None) -> list[SiteLedger]:
    """The sites ``site-1 ... site-K`` of ``site_paths`` with their ledgers in
    ``ledger_dir`` (None: the per-user folder). ``budget_epsilon`` is set on a dataset's
    first use (None: 2 x the job's ε); a ledger that already holds a budget keeps it unless
    one is given. ``check``: refuse (BudgetExceededError, exit 3) a job that would take a
    site over its budget, before anything is charged (off for a resumed job, whose earlier
    rounds are already in the ledgers)."""
    names = [f"site-{i}" for i in range(1, len(site_paths) + 1)]
    if not job.private:  # --dp none: nodes keep no ledger (and refuse nothing)
        return [SiteLedger(n, Path(p), None, None) for n, p in zip(names, site_paths,
                                                                    strict=True)]
    ledger = shared_ledger(ledger_dir)
    book = BudgetLedger(ledger)
    checked = check and bool(book.entries())  # an empty ledger refuses nothing
    sites, seen = [], {}
    for name, path in zip(names, site_paths, strict=True):
        node = SiteNode(path, name=name)
        train = node.bundle.train
        dataset_id = train.dataset_id
        if dataset_id in seen:
            raise ConfigError(f"{seen[dataset_id]} and {name} hold the same training images "
                              f"(dataset {dataset_id}); give each site its own data.")
        seen[dataset_id] = name
        known = book.budget(dataset_id) is not None
        budget = budget_epsilon if budget_epsilon is not None or known else 2 * job.epsilon
        # Opened as the node will open it: a first budget is set, a different one refused.
        node = SiteNode(node.bundle, ledger=ledger, budget_epsilon=budget, name=name)
        if checked:  # sites of one size share a calibration (plan_privacy caches it)
            book.check(dataset_id, node.planned_history(job),
                       verb=f"Refused for {name} (ledger {ledger})",
                       records=node.privacy_records())  # as the node charges them
        sites.append(SiteLedger(name, Path(path), ledger, budget))
    if say is not None:
        say(f"Site ledger {ledger} (one for every site, charged per record; --ledger-dir "
            "to choose the folder).")
    return sites
