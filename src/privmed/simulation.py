"""``privmed.simulate``: a federated job over several sites, all in this process.

The sites are DataBundles (or data sources), or one bundle dealt to ``num_sites`` sites
(:func:`privmed.data.split_sites`, whole patients when known). Every site is a real
:class:`~privmed.federation.SiteNode` behind a real ledger, rounds go through
:class:`~privmed.federation.InProcessTransport` (the same request handler as a node
process) and, by default, secure aggregation: what ``privmed simulate`` runs on Flower's
engine, without Flower, Ray or files to write. For notebooks, tests and quick studies.

Only the names ``privmed.federation`` exports are used here, and the sites' ledgers of
``federation.runtime.site_ledgers`` (the one owner of a site's first budget and of the
whole-job check, shared with ``privmed federate``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from privmed.data import DataBundle, ImageDataset, load_data, split_sites
from privmed.errors import ConfigError
from privmed.federation import FederationConfig, InProcessTransport, SiteNode, run_federation
from privmed.federation.config import default_rounds, federation_job
from privmed.federation.runtime.deploy import job_id_for

__all__ = ["default_rounds", "federation_job", "simulate"]

SiteData = DataBundle | str | Path


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


def _site_nodes(bundles: list[DataBundle], job: FederationConfig,
                ledger_dir: str | Path | None, budget_epsilon: float | None,
                log: Callable[[str], None] | None) -> dict[int, SiteNode]:
    """One node per site, each charging the sites' shared, per-record ledger in
    ``ledger_dir``, with the budgets and the up-front whole-job check of ``federate``
    (:func:`~privmed.federation.runtime.site_ledgers.site_ledgers`): a job that would take a
    site over its budget is refused (BudgetExceededError) before any round."""
    from privmed.federation.runtime.site_ledgers import site_ledgers

    sites = site_ledgers(bundles, job, Path(ledger_dir) if ledger_dir is not None else None,
                         budget_epsilon)
    if log is not None and sites and sites[0].ledger is not None:
        log(f"Site ledger {sites[0].ledger} (one for every site, charged per record).")
    return {i: SiteNode(s.data, ledger=s.ledger, budget_epsilon=s.budget_epsilon,
                        name=s.name, max_sites=len(sites) if len(sites) >= 2 else None)
            for i, s in enumerate(sites, start=1)}


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
    ``epsilon``) set on its data's first use; a job that would take a site over its
    budget is refused before any round (BudgetExceededError), as ``privmed federate`` is.
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
    job = federation_job(job_id_for(out, False), model, rounds=rounds, local_epochs=local_epochs,
                         batch_size=batch_size, lr=lr, dp=dp, epsilon=epsilon, delta=delta,
                         secure_agg=secure_agg, normalize=normalize, seed=seed,
                         min_nodes=len(bundles), **settings)
    nodes = _site_nodes(bundles, job, ledger_dir, budget_epsilon, log)
    return run_federation(InProcessTransport(nodes), job, held, out,
                          log=log if log is not None else (lambda _: None),
                          source=source)
