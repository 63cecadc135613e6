"""``privmed node | coordinator | federate | simulate | certs``: federated training on Flower.

Each command parses its options, calls one function of ``federation.runtime.deploy``
(or ``certs``) and prints; the defaults, checks and processes are the library's."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from privmed.cli.app import app, console
from privmed.cli.printing import print_federated_results, round_progress, say

Rounds = Annotated[int | None, typer.Option(
    "--rounds", help="Federated rounds R (default: 30 with --dp distributed, one DP-SGD step "
    "each; 5 otherwise).")]
LocalEpochs = Annotated[int, typer.Option(
    "--local-epochs", help="Local epochs E per round (--dp local and none).")]
Dp = Annotated[str | None, typer.Option(
    "--dp", help="distributed (each node adds a share of one central DP-SGD step's noise; "
    "needs secure aggregation, the default with it), local (each node runs DP-SGD; the "
    "default without it) or none.")]
ThresholdOpt = Annotated[float, typer.Option(
    "--secagg-threshold", help="Fraction of the nodes that must survive a secure round "
    "(never fewer than a strict majority, nor 2: nodes refuse less); with --dp "
    "distributed each node adds 1/sqrt(t) of the noise, so 1.0 gives "
    "exactly central noise but no tolerance of a dropout.")]
OptimisticOpt = Annotated[bool, typer.Option(
    "--secagg-optimistic/--no-secagg-optimistic",
    help="Secure training rounds without self masks (default): one message exchange per "
    "round instead of two when every node answers; the first round with a missing node is "
    "lost and later rounds add self masks (docs/threat-model.md).")]
NormalizeOpt = Annotated[bool, typer.Option(
    "--normalize/--no-normalize",
    help="Measure the sites' pixel mean/std (with DP, through the aggregation) before "
    "training and standardise the inputs with them (for CNNs; the scattering models "
    "normalise their features themselves).")]
Epsilon = Annotated[float, typer.Option(
    "--epsilon", help="Each node's target epsilon for the whole job.")]


@app.command()
def node(
    data: Annotated[str, typer.Option("--data", help="This site's images (any privmed source).")],
    superlink: Annotated[str, typer.Option("--superlink", help="Coordinator HOST:PORT.")],
    ledger: Annotated[Path | None, typer.Option(
        "--ledger", help="This site's privacy-budget ledger (SQLite).")] = None,
    budget_epsilon: Annotated[float | None, typer.Option(
        "--budget-epsilon", help="The site's total budget, set on first use.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Site name in reports.")] = None,
    size: Annotated[int | None, typer.Option("--size", help="Resize images.")] = None,
    home: Annotated[Path | None, typer.Option(
        "--home", help="Folder for the node's Flower state and logs.")] = None,
    root_cert: Annotated[Path | None, typer.Option(
        "--root-cert", help="The federation's CA certificate (TLS); required unless "
        "--insecure.")] = None,
    auth_key: Annotated[Path | None, typer.Option(
        "--auth-key", help="This node's private key (SuperNode authentication).")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Connect without TLS or node authentication (plain text: only "
        "on loopback or a network you trust).")] = False,
    max_sites: Annotated[int | None, typer.Option(
        "--max-sites", help="How many hospitals the federation has, as agreed with the "
        "others: a secure-aggregation roster with more nodes is refused.")] = None,
    connect_timeout: Annotated[float, typer.Option(
        "--connect-timeout", help="Give up after this many seconds in which the coordinator "
        "could not be reached or did not accept this node's key (retried with backoff: the "
        "coordinator may not have registered it yet); 0: keep trying.")] = 300.0,
) -> None:
    """Run a hospital's node: local DP training for each round, checked against its ledger."""
    from privmed.federation.runtime.deploy import run_node
    from privmed.federation.runtime.launcher import require_flower

    require_flower()
    run_node(data, superlink=superlink, ledger=ledger, budget_epsilon=budget_epsilon,
             name=name, size=size, home=home, root_cert=root_cert, auth_key=auth_key,
             insecure=insecure, max_sites=max_sites, connect_timeout=connect_timeout or None,
             say=lambda s: console.print(s, highlight=False))


@app.command()
def coordinator(
    heldout: Annotated[Path, typer.Option(
        "--heldout", help="Held-out images the coordinator evaluates on (e.g. test.npz).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder.")] = Path("runs/federated"),
    model: Annotated[str | None, typer.Option("--model")] = None,
    rounds: Rounds = None, local_epochs: LocalEpochs = 2,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 256,
    lr: Annotated[float, typer.Option("--lr")] = 1e-2,
    dp: Dp = None, epsilon: Epsilon = 3.0,
    delta: Annotated[float | None, typer.Option("--delta")] = None,
    min_nodes: Annotated[int, typer.Option(
        "--min-nodes", help="Nodes that must be connected before the first round.")] = 2,
    host: Annotated[str, typer.Option(
        "--host", help="Address the nodes' port listens on (0.0.0.0: all).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="The nodes' port (Fleet API only).")] = 9092,
    certs: Annotated[Path | None, typer.Option(
        "--certs", help="Folder from 'privmed certs': TLS plus node authentication; "
        "required unless --insecure.")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Serve the nodes without TLS or node authentication (plain "
        "text: only on loopback or a network you trust).")] = False,
    node_wait: Annotated[float, typer.Option(
        "--node-wait", help="Give up (with the names of the nodes still missing) if fewer "
        "than --min-nodes nodes are connected after this many seconds; also how long a "
        "later round waits for at least one node.")] = 600.0,
    round_timeout: Annotated[float, typer.Option("--round-timeout")] = 600.0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue after a crash.")] = False,
    secure_agg: SecureOpt = True, normalize: NormalizeOpt = False,
    secagg_threshold: ThresholdOpt = 2 / 3, secagg_optimistic: OptimisticOpt = True,
) -> None:
    """Run the coordinator: a Flower SuperLink plus FedAvg rounds and held-out evaluation."""
    from privmed.federation.runtime.deploy import run_coordinator

    results = run_coordinator(
        heldout, out, host=host, port=port, certs=certs, insecure=insecure,
        min_nodes=min_nodes, node_wait=node_wait, resume=resume, model=model, rounds=rounds,
        local_epochs=local_epochs, batch_size=batch_size, lr=lr, dp=dp, epsilon=epsilon,
        delta=delta, round_timeout=round_timeout, secure_agg=secure_agg, normalize=normalize,
        secagg_threshold=secagg_threshold, secagg_optimistic=secagg_optimistic, say=say,
        watch=round_progress)
    print_federated_results(results, out)


SiteDataOpt = Annotated[list[Path] | None, typer.Option(
    "--site-data", help="One dataset per site instead of --data (repeat).")]
HeldoutOpt = Annotated[Path | None, typer.Option(
    "--heldout", help="Held-out set with --site-data.")]
SchemeOpt = Annotated[str, typer.Option("--scheme", help="iid or dirichlet.")]
BudgetOpt = Annotated[float | None, typer.Option(
    "--budget-epsilon", help="Each site's ledger budget, set when its data is first used "
    "(default: 2 x --epsilon); a budget already in the ledger is kept unless given.")]
LedgerDirOpt = Annotated[Path | None, typer.Option(
    "--ledger-dir", help="Folder of the sites' privacy ledger, ledger.sqlite, charged per "
    "patient or image (the same people find their budget whatever --out or file they come "
    "in; default: $XDG_DATA_HOME/privmed/ledgers or "
    "~/.local/share/privmed/ledgers).")]


AlphaOpt = Annotated[float, typer.Option("--alpha", help="Dirichlet concentration.")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Registered model name.")]
BatchOpt = Annotated[int, typer.Option(
    "--batch-size", help="Each node's batch size (expected size of its Poisson batch).")]
LrOpt = Annotated[float, typer.Option(
    "--lr", help="Adam learning rate: the nodes' (--dp local) or the coordinator's "
    "(--dp distributed).")]
DeltaOpt = Annotated[float | None, typer.Option("--delta")]
SeedOpt = Annotated[int, typer.Option("--seed")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue after a crash.")]
SecureOpt = Annotated[bool, typer.Option(
    "--secure-agg/--no-secure-agg",
    help="Secure aggregation (default): the coordinator sees only the sum of the updates; "
    "--no-secure-agg to compare.")]


def _run_sites(simulation: bool, out: Path, **options: object) -> None:
    """federate and simulate: the same sites and job, on processes or on Ray."""
    from privmed.federation.runtime.local import run_sites

    results = run_sites(out, simulation=simulation, say=say, watch=round_progress,
                        **options)  # type: ignore[arg-type]
    print_federated_results(results, out)


@app.command()
def federate(
    data: Annotated[str | None, typer.Option(
        "--data", help="One dataset to split across --sites sites.")] = "synthetic",
    sites: Annotated[int, typer.Option("--sites", help="Number of sites.")] = 3,
    site_data: SiteDataOpt = None, heldout: HeldoutOpt = None, scheme: SchemeOpt = "iid",
    alpha: AlphaOpt = 0.5,
    out: Annotated[Path, typer.Option("--out", help="Run folder.")] = Path("runs/federated"),
    model: ModelOpt = None, rounds: Rounds = None, local_epochs: LocalEpochs = 2,
    batch_size: BatchOpt = 256, lr: LrOpt = 1e-2, dp: Dp = None, epsilon: Epsilon = 3.0,
    delta: DeltaOpt = None, budget_epsilon: BudgetOpt = None, seed: SeedOpt = 0,
    round_timeout: Annotated[float, typer.Option("--round-timeout")] = 600.0,
    resume: ResumeOpt = False, secure_agg: SecureOpt = True, normalize: NormalizeOpt = False,
    secagg_threshold: ThresholdOpt = 2 / 3, ledger_dir: LedgerDirOpt = None,
    secagg_optimistic: OptimisticOpt = True,
) -> None:
    """Split the data, start a SuperLink and one node per site on loopback, and run the job."""
    _run_sites(False, **locals())


@app.command()
def simulate(
    data: Annotated[str | None, typer.Option(
        "--data", help="One dataset to split across --sites virtual sites.")] = "synthetic",
    sites: Annotated[int, typer.Option("--sites", help="Number of virtual sites.")] = 100,
    site_data: SiteDataOpt = None, heldout: HeldoutOpt = None, scheme: SchemeOpt = "iid",
    alpha: AlphaOpt = 0.5,
    out: Annotated[Path, typer.Option("--out", help="Run folder.")] = Path("runs/simulated"),
    model: ModelOpt = None, rounds: Rounds = None, local_epochs: LocalEpochs = 2,
    batch_size: BatchOpt = 256, lr: LrOpt = 1e-2, dp: Dp = None, epsilon: Epsilon = 3.0,
    delta: DeltaOpt = None, budget_epsilon: BudgetOpt = None, seed: SeedOpt = 0,
    round_timeout: Annotated[float, typer.Option("--round-timeout")] = 3600.0,
    resume: ResumeOpt = False, secure_agg: SecureOpt = True, normalize: NormalizeOpt = False,
    secagg_threshold: ThresholdOpt = 2 / 3, ledger_dir: LedgerDirOpt = None,
    secagg_optimistic: OptimisticOpt = True,
) -> None:
    """The same federated job on Flower's simulation engine (Ray): many virtual sites."""
    _run_sites(True, **locals())


@app.command()
def certs(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the credentials to.")],
    nodes: Annotated[list[str], typer.Option("--node", help="A node's name (repeat).")],
    host: Annotated[list[str] | None, typer.Option(
        "--host", help="DNS name or IP the coordinator is reached at (repeat).")] = None,
    days: Annotated[int, typer.Option("--days", help="Validity in days.")] = 365,
) -> None:
    """Provision a CA, the coordinator's TLS certificate and one key pair per node."""
    from privmed.federation.runtime.certs import provision

    hosts = host or ["localhost", "127.0.0.1"]
    provision(out, hosts=hosts, nodes=nodes, days=days)
    console.print(f"Wrote {out}/ca.crt, server.pem/.key (valid for nodes connecting to "
                  f"{', '.join(hosts)}; {days} days) and nodes/NAME.key/.pub for "
                  f"{', '.join(nodes)}; private keys are readable by you only.")
    console.print(f"Coordinator: privmed coordinator --certs {out} ...; each hospital gets "
                  f"ca.crt and its nodes/NAME.key: privmed node --root-cert ca.crt --auth-key "
                  "NAME.key ...")
