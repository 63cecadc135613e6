"""``privmed.simulate``: a federated job over several sites, all in this process.

The sites are DataBundles (or data sources), or one bundle dealt to ``num_sites`` sites
(:func:`privmed.data.split_sites`, whole patients when known). Every site is a real
:class:`~privmed.federation.SiteNode` behind a real ledger, rounds go through
:class:`~privmed.federation.InProcessTransport` (the same request handler as a node
process) and, by default, secure aggregation: what ``privmed simulate`` runs on Flower's
engine, without Flower, Ray or files to write. For notebooks, tests and quick studies.

Only the names ``privmed.federation`` exports are used here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from privmed.data import DataBundle, ImageDataset, load_data, split_sites
from privmed.errors import ConfigError
from privmed.federation import FederationConfig, InProcessTransport, SiteNode, run_federation
from privmed.models import RECOMMENDED_MODEL
from privmed.privacy import BudgetLedger
from privmed.privacy.ledger_home import shared_ledger

SiteData = DataBundle | str | Path


def default_rounds(dp: str | None, secure_agg: bool) -> int:
    """Rounds when none are asked for: 30 under distributed DP (one DP-SGD step each,
    cheap), 5 otherwise (each round trains ``local_epochs``)."""
    distributed = dp == "distributed" or (dp is None and secure_agg)
    return 30 if distributed else 5


def federation_job(job_id: str, model: str | None = None, *, rounds: int | None = None,
                   **settings: Any) -> FederationConfig:
    """A FederationConfig with privmed's defaults: the recommended model and
    :func:`default_rounds` (``settings``: the other FederationConfig fields)."""
    if rounds is None:
        rounds = default_rounds(settings.get("dp"), settings.get("secure_agg", True))
    return FederationConfig(job_id=job_id, model=model or RECOMMENDED_MODEL, rounds=rounds,
                            **settings)


def _job_id(out: Path) -> str:
    """A fresh id per job (nodes key their stored replies by it): folder + start time."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", out.resolve().name).strip("-._")[:50] or "job"
    return f"{stem}-{time.strftime('%Y%m%dT%H%M%S')}"


def _heldout(heldout: ImageDataset | DataBundle | str | Path | None,
             one: DataBundle | None) -> ImageDataset:
    if heldout is None:
        if one is None or one.test is None:
            raise ConfigError("Give heldout= (the images the coordinator evaluates on); only "
                              "one bundle with a test split supplies it by itself.")
        return one.test
    if isinstance(heldout, ImageDataset):
        return heldout
    if isinstance(heldout, DataBundle):
        if heldout.test is None:
            raise ConfigError("The held-out bundle has no test split.")
        return heldout.test
    from privmed.data.evalset import load_eval_split

    return load_eval_split(heldout)[0]


def _site_nodes(bundles: list[DataBundle], job: FederationConfig, ledger: Path | None,
                budget_epsilon: float | None) -> dict[int, SiteNode]:
    """One node per site, each charging ``ledger`` (the sites' shared, per-record one).
    A site's budget is set on its data's first use: ``budget_epsilon``, else twice the
    job's ε; a ledger that already holds one keeps it unless ``budget_epsilon`` is given."""
    nodes, seen = {}, {}
    book = BudgetLedger(ledger) if ledger is not None else None
    for i, bundle in enumerate(bundles, start=1):
        name = f"site-{i}"
        dataset_id = bundle.train.dataset_id
        if dataset_id in seen:
            raise ConfigError(f"{seen[dataset_id]} and {name} hold the same training images "
                              f"(dataset {dataset_id}); give each site its own data.")
        seen[dataset_id] = name
        budget = None
        if book is not None:
            known = book.budget(dataset_id) is not None
            budget = (budget_epsilon if budget_epsilon is not None or known
                      else 2 * job.epsilon)
        nodes[i] = SiteNode(bundle, ledger=ledger, budget_epsilon=budget, name=name,
                            max_sites=len(bundles) if len(bundles) >= 2 else None)
    return nodes


def simulate(sites: SiteData | Sequence[SiteData], out: str | Path, *,
             heldout: ImageDataset | DataBundle | str | Path | None = None,
             num_sites: int = 3, scheme: str = "iid", alpha: float = 0.5,
             model: str | None = None, rounds: int | None = None, local_epochs: int = 2,
             batch_size: int = 256, lr: float = 1e-2, dp: str | None = None,
             epsilon: float = 3.0, delta: float | None = None, secure_agg: bool = True,
             normalize: bool = False, seed: int = 0,
             ledger_dir: str | Path | None = None, budget_epsilon: float | None = None,
             log: Callable[[str], None] | None = print, **settings: Any) -> dict[str, Any]:
    """Run a federated job over ``sites`` in this process; write the run to ``out``.

    ``sites``: a list of DataBundles or data sources (one per hospital), or one
    bundle / source split IID (``scheme="dirichlet"``: label-skewed by ``alpha``) into
    ``num_sites`` sites. ``heldout``: the coordinator's evaluation images (default: the
    single bundle's test split). DP: ``dp`` is ``"distributed"`` (the default under secure
    aggregation: each site adds its share of one central DP-SGD step's noise per round),
    ``"local"`` (each site runs DP-SGD for ``local_epochs``) or ``"none"``; every site
    reaches at most ``epsilon`` over the whole job on its own data. Each site charges
    the ledger ``ledger_dir/ledger.sqlite`` (default: the per-user ledger folder,
    ``$XDG_DATA_HOME/privmed/ledgers``), with ``budget_epsilon`` (default 2 x
    ``epsilon``) set on its data's first use; a site over budget refuses its rounds.
    ``rounds`` defaults to 30 under distributed DP, 5 otherwise. ``settings``: other
    :class:`~privmed.federation.FederationConfig` fields (``secagg_threshold``,
    ``max_grad_norm``...). ``log``: progress lines (None: quiet).

    Returns the run's results (as ``privmed federate``): ``results["privacy"]`` holds
    the weakest site's (ε, δ) and ``per_node``, ``results["metrics"]["test"]`` the
    global model on the held-out images. ::

        bundle = privmed.load_data("synthetic")
        results = privmed.simulate(bundle, "runs/fed", num_sites=3, rounds=30, epsilon=3)
    """
    out = Path(out)
    one = None
    if isinstance(sites, DataBundle | str | Path):
        one = sites if isinstance(sites, DataBundle) else load_data(sites, seed=seed)
        bundles = split_sites(one, num_sites, scheme, alpha, seed)
        source = f"{one.source} split over {num_sites} sites ({scheme}), in-process"
    else:
        bundles = [s if isinstance(s, DataBundle) else load_data(s, seed=seed) for s in sites]
        if len(bundles) == 1 and heldout is None:
            one = bundles[0]
        source = f"{len(bundles)} site datasets, in-process"
    if not bundles:
        raise ConfigError("Give at least one site.")
    held = _heldout(heldout, one)
    job = federation_job(_job_id(out), model, rounds=rounds, local_epochs=local_epochs,
                         batch_size=batch_size, lr=lr, dp=dp, epsilon=epsilon, delta=delta,
                         secure_agg=secure_agg, normalize=normalize, seed=seed,
                         min_nodes=len(bundles), **settings)
    # --dp none: nodes keep no ledger (and refuse nothing).
    ledger = shared_ledger(ledger_dir) if job.private else None
    nodes = _site_nodes(bundles, job, ledger, budget_epsilon)
    quiet = log is None
    if not quiet and ledger is not None:
        log(f"Site ledger {ledger} (one for every site, charged per record).")
    return run_federation(InProcessTransport(nodes), job, held, out,
                          log=log if log is not None else (lambda _: None),
                          source=source)
