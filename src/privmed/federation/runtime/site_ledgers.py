"""Each local site's ledger, keyed to its data (``federate``, ``simulate`` and
``privmed.simulate``).

Every site of a local job is charged to one ledger, ``LEDGER_DIR/ledger.sqlite``
(``privacy.ledger_home``: the per-user folder unless ``--ledger-dir`` says otherwise),
which charges the records a site trains on (patients when the data names them, else
images): a second job on the same data finds the budget the first one spent, whatever
its ``--out``, and so does a job on a re-exported, shrunk or grown copy of it. Before any
process starts, every site's whole planned spend is checked against the ledger (the
check the node repeats before each round), so a job that would overspend is refused at
once with the ledger's sentence rather than after every site has refused every round.
A site's first budget is chosen here only (:func:`first_budget`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from privmed.data import DataBundle
from privmed.errors import ConfigError
from privmed.federation.config import FederationConfig
from privmed.federation.node.site import SiteNode
from privmed.privacy import BudgetLedger
from privmed.privacy.ledger_home import shared_ledger


@dataclass(frozen=True)
class SiteLedger:
    """One site of a local job: its data (a file, or a DataBundle in process), name,
    ledger and the budget to set (None: keep the one the ledger holds, or no ledger at all
    for ``--dp none``)."""

    name: str
    data: Path | DataBundle
    ledger: Path | None
    budget_epsilon: float | None


def first_budget(job: FederationConfig, given: float | None, known: bool) -> float | None:
    """The budget a site's ledger is opened with: ``given`` (``--budget-epsilon``) when
    there is one; else, on the data's first use (``known`` False: the ledger holds no
    budget for it yet), twice the job's ε; else None (keep the ledger's). None without DP
    (no ledger)."""
    if not job.private:
        return None
    if given is not None or known:
        return given
    return 2 * job.epsilon


def site_ledgers(sites: Sequence[Path | str | DataBundle], job: FederationConfig,
                 ledger_dir: Path | None, budget_epsilon: float | None, *,
                 check: bool = True,
                 say: Callable[[str], None] | None = None) -> list[SiteLedger]:
    """The sites ``site-1 ... site-K`` of ``sites`` (data files, or DataBundles for a job
    in this process) with their ledger in ``ledger_dir`` (None: the per-user folder) and
    the budget of :func:`first_budget`. ``check``: refuse (BudgetExceededError, exit 3) a
    job that would take a site over its budget, before anything is charged (off for a
    resumed job, whose earlier rounds are already in the ledgers)."""
    names = [f"site-{i}" for i in range(1, len(sites) + 1)]
    data = [s if isinstance(s, DataBundle) else Path(s) for s in sites]
    if not job.private:  # --dp none: nodes keep no ledger (and refuse nothing)
        _distinct([(n, d.train.dataset_id) for n, d in zip(names, data, strict=True)
                   if isinstance(d, DataBundle)])  # files: no need to load them here
        return [SiteLedger(n, d, None, None) for n, d in zip(names, data, strict=True)]
    ledger = shared_ledger(ledger_dir)
    book = BudgetLedger(ledger)
    checked = check and bool(book.entries())  # an empty ledger refuses nothing
    nodes = [SiteNode(d, name=n) for n, d in zip(names, data, strict=True)]
    _distinct([(node.name, node.dataset_id) for node in nodes])
    out = []
    for node, given in zip(nodes, data, strict=True):
        budget = first_budget(job, budget_epsilon, book.budget(node.dataset_id) is not None)
        # Opened as the node will open it: a first budget is set, a different one refused.
        node = SiteNode(node.bundle, ledger=ledger, budget_epsilon=budget, name=node.name)
        if checked:  # sites of one size share a calibration (plan_privacy caches it)
            book.check(node.dataset_id, node.planned_history(job),
                       verb=f"Refused for {node.name} (ledger {ledger})",
                       records=node.privacy_records())  # as the node charges them
        out.append(SiteLedger(node.name, given, ledger, budget))
    if say is not None:
        say(f"Site ledger {ledger} (one for every site, charged per record; --ledger-dir "
            "to choose the folder).")
    return out


def _distinct(sites: list[tuple[str, str]]) -> None:
    """Refuse two sites with the same training images: they would share (and so
    double-spend) one budget."""
    seen: dict[str, str] = {}
    for name, dataset_id in sites:
        if dataset_id in seen:
            raise ConfigError(f"{seen[dataset_id]} and {name} hold the same training images "
                              f"(dataset {dataset_id}); give each site its own data.")
        seen[dataset_id] = name
