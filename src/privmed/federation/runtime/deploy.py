"""The roles as commands: a hospital's node and the coordinator (``runtime.local`` runs
both on one machine: ``federate``, ``simulate``).

Everything a federated command decides lives here and in ``runtime.local`` (the CLI only
parses, calls one of :func:`run_node`, :func:`run_coordinator` or ``run_sites``, and
prints): the job with
privmed's defaults (``federation_job``), the transport's security checks, the processes
(started, waited for and always stopped) and the rounds followed to the end. ``watch``:
given the job's rounds, a context manager around the rounds that yields the callback
each round's record goes to (the CLI's progress bar).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from privmed.errors import ConfigError, NetworkError
from privmed.federation.config import FederationConfig, federation_job
from privmed.federation.messages import unpack
from privmed.federation.runtime.launcher import (
    FlowerCli,
    flower_env,
    gateway_command,
    superlink_command,
    write_app,
)
from privmed.processes import ProcessGroup, connect_host, free_port, host_port, wait_for_port

JOB_FILE = "job.json"
STATUS_POLL = 3.0  # seconds between asking the SuperLink whether the job has finished
#: Given the job's rounds: a context manager around them yielding the per-round callback.
Watch = Callable[[int], AbstractContextManager[Callable[[dict], None] | None]]


def watched(watch: Watch | None, rounds: int
             ) -> AbstractContextManager[Callable[[dict], None] | None]:
    return watch(rounds) if watch is not None else nullcontext(None)


# ----------------------------------------------------------------------------- node

def check_node_transport(root_cert: Path | None, auth_key: Path | None,
                         insecure: bool) -> tuple[Path | None, Path | None]:
    """TLS unless ``insecure`` was asked for; the files, resolved and checked."""
    from privmed.federation.runtime.certs import check_ca_cert, check_private

    if insecure and (root_cert is not None or auth_key is not None):
        raise ConfigError("--insecure turns TLS and node authentication off; drop it, or drop "
                          "--root-cert and --auth-key.")
    if not insecure and root_cert is None:
        raise ConfigError("Give --root-cert (the federation's ca.crt from 'privmed certs') so "
                          "that the connection to the coordinator is encrypted, or --insecure "
                          "for plain text on a trusted network.")
    if auth_key is not None:
        check_private(auth_key, "authentication key")
    if root_cert is not None:
        check_ca_cert(root_cert)
    return (root_cert.resolve() if root_cert else None,
            auth_key.resolve() if auth_key else None)


def run_node(data: str, *, superlink: str, ledger: Path | None, budget_epsilon: float | None,
             name: str | None = None, size: int | None = None, home: Path | None = None,
             root_cert: Path | None = None, auth_key: Path | None = None,
             insecure: bool = False, max_sites: int | None = None,
             connect_timeout: float | None = 300.0,
             say: Callable[[str], None] = print) -> None:
    """Load the site's data and ledger, then serve rounds through a SuperNode until it
    stops (Ctrl-C, or the SuperNode exits). A coordinator that cannot be reached, or
    keeps refusing this node's key, for ``connect_timeout`` seconds (None: keep trying)
    ends the node with NetworkError. ``max_sites``: the most sites this hospital knows
    the federation has (a larger secure-aggregation roster is refused)."""
    from privmed.federation.node.handler import handle_request
    from privmed.federation.node.site import SiteNode
    from privmed.federation.node.worker import NodeWorker, write_secret
    from privmed.federation.runtime.certs import private_dir
    from privmed.federation.runtime.node_link import SuperNodeLink

    root_cert, auth_key = check_node_transport(root_cert, auth_key, insecure)
    node = SiteNode(data, ledger=ledger, budget_epsilon=budget_epsilon, name=name, size=size,
                    max_sites=max_sites)
    # The node's home holds the worker's secret and Flower's state: its owner's only.
    home = private_dir(Path(home or tempfile.mkdtemp(prefix="privmed-node-")).resolve())
    # A short path (Unix socket names are limited to ~100 bytes) in a 0700 folder.
    sock_dir = Path(tempfile.mkdtemp(prefix="pmn-"))
    key = write_secret(home / "worker.key")

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        answer = handle_request(node, request)
        if request.get("kind", "train") == "train":
            meta = unpack(answer["meta"])
            say(f"Round {request['round']}: {meta.get('status')}"
                + (f" ({meta['reason']})" if meta.get("reason") else ""))
        return answer

    worker = NodeWorker(sock_dir / "worker.sock", key, handle)
    config = {"worker": str(worker.address), "worker-key": str(home / "worker.key")}
    try:
        with ProcessGroup() as group:
            link = SuperNodeLink(group, superlink, config, home, root_cert, auth_key, say)
            say(f"Node {node.name} ({node.num_examples} training images) is connecting to "
                f"{superlink}" + ("" if root_cert else " WITHOUT TLS") + "; Ctrl-C stops it.")
            proc = link.admit(connect_timeout)
            worker.serve_in_thread(say)  # only now: SuperNodes are forked until admission
            say(f"Node {node.name} is connected; it serves the coordinator's rounds.")
            while proc.poll() is None:
                time.sleep(0.5)
            raise NetworkError(link.stopped(proc))
    finally:
        worker.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- coordinator

class Coordinator:
    """A SuperLink plus the privmed ServerApp for one job, all stopped on exit.

    ``public``: serve the nodes on ``host:port`` through the Fleet-only gateway
    (``fleet_gateway``) with the SuperLink itself on loopback, so that its Control API
    (register keys, submit apps) is never reachable from the network; with ``certs`` the
    gateway speaks TLS with the federation's certificate and the SuperLink demands
    SuperNode authentication. Without ``public`` (``federate``, ``simulate``) the
    SuperLink listens on loopback for nodes on this machine."""

    def __init__(self, group: ProcessGroup, work: Path, *, host: str = "127.0.0.1",
                 port: int | None = None, certs: Path | None = None,
                 simulation: bool = False, public: bool = False,
                 say: Callable[[str], None] | None = None) -> None:
        from privmed.federation.runtime.certs import check_server_credentials, loopback_tls

        certs = certs.resolve() if certs is not None else None
        work = work.resolve()
        self.group, self.work, self.certs = group, work, certs
        self.names: dict[int, str] = {}  # node id -> name of its registered key
        self.hosts = check_server_credentials(certs) if certs is not None else []
        tls = loopback_tls(work / "loopback-tls") if certs is not None else None
        link_port = free_port() if public else (port or free_port())
        log = work / "superlink.log"
        proc = group.start("superlink", superlink_command(link_port, "127.0.0.1", tls,
                                                          simulation),
                           flower_env(work / "flwr-link"), log)
        wait_for_port("127.0.0.1", link_port, proc, "SuperLink", log, say=say)
        self.cli = FlowerCli(work / "flwr-cli", f"127.0.0.1:{link_port}",
                             tls[0] if tls else None)
        if certs is not None:
            for pub in sorted((certs / "nodes").glob("*.pub")):
                self.names[self.cli.register(pub)] = pub.stem
        self.port, self.address = link_port, f"127.0.0.1:{link_port}"
        if public:
            # Opened only now, with every key registered: a node that connects at once is
            # admitted instead of being refused for a key the coordinator is still adding.
            self.port = port or free_port()
            glog = work / "gateway.log"
            gateway = group.start("gateway", gateway_command(
                host, self.port, f"{'https' if tls else 'http'}://{self.address}",
                tls[0] if tls else None, certs), flower_env(work / "flwr-gateway"), glog)
            wait_for_port(host, self.port, gateway, "Fleet gateway", glog, say=say)
            self.address = host_port(connect_host(host), self.port)

    def wait_for_nodes(self, count: int, timeout: float, procs: list | None = None,
                       say: Callable[[str], None] | None = None) -> None:
        """Until ``count`` nodes are online. Says who is missing when that changes (and
        every 30 s); gives up with NetworkError after ``timeout`` seconds."""
        deadline, told, last = time.monotonic() + timeout, 0.0, ""
        while True:
            for p in procs or []:
                if p.poll() is not None:
                    raise NetworkError(f"A node stopped before connecting (code {p.returncode})"
                                       f"; see the logs in {self.work}.")
            try:
                online = {int(n["node-id"]) for n in self.cli.nodes()
                          if n.get("status") == "online"}
            except NetworkError:
                online = set()
            if len(online) >= count:
                return
            missing = ", ".join(sorted(name for node_id, name in self.names.items()
                                       if node_id not in online))
            state = f"{len(online)} of {count}" + (f"; not connected: {missing}" if missing
                                                    else "")
            now = time.monotonic()
            if now > deadline:
                raise NetworkError(
                    f"Fewer nodes than --min-nodes connected within {timeout:.0f} s "
                    f"(--node-wait): {state}; check that each hospital runs 'privmed node' "
                    "against this coordinator (its output says why it is not admitted).")
            if say is not None and (state != last or now - told > 30):
                say(f"Waiting for nodes: {state} (giving up in {deadline - now:.0f} s, "
                    "--node-wait).")
                told, last = now, state
            time.sleep(1.0)

    def run(self, job: FederationConfig, heldout: Path, out: Path, *, resume: bool,
            source: str, node_wait: float = 120.0,
            on_round: Callable[[dict], None] | None = None,
            simulation: dict[str, Any] | None = None) -> dict:
        """Submit the job and follow it to the end. ``simulation`` (sites, ledgers,
        budgets) runs it on Flower's simulation engine with one virtual node per
        site instead of on connected SuperNodes."""
        from privmed.report import read_results

        spec = {"job": job.to_record(), "heldout": str(heldout.resolve()),
                "out": str(out.resolve()), "resume": resume, "node_wait": node_wait,
                "source": source, "simulation": simulation}
        (out / JOB_FILE).write_text(json.dumps(spec, indent=2), encoding="utf-8")
        app = write_app(self.work / "app")
        federation = None
        if simulation is not None:
            # One virtual node per actor CPU; secure aggregation's per-node keys travel
            # in each node's Context.state (flower_apps), so any actor can serve a node.
            federation = {"num-supernodes": len(simulation["sites"]),
                          "client-resources-num-cpus": 1}
        run_id = self.cli.submit(app, {"job-file": str((out / JOB_FILE).resolve())},
                                 federation)
        rounds_log, seen = out / "rounds.jsonl", 0
        status, asked = "unknown", 0.0
        try:
            while True:
                # Each status query is a fresh `flwr` process (about a CPU-second): asked
                # every few seconds, it no longer slows the rounds it watches on a small
                # machine; the rounds themselves are followed in rounds.jsonl.
                if time.monotonic() - asked >= STATUS_POLL:
                    status, asked = self.cli.status(run_id), time.monotonic()
                if rounds_log.exists() and on_round is not None:
                    lines = rounds_log.read_text(encoding="utf-8").splitlines()
                    for line in lines[seen:]:
                        on_round(json.loads(line))
                    seen = len(lines)
                if status.startswith("finished"):
                    break
                time.sleep(0.5)
        except BaseException:
            self.cli.stop_run(run_id)
            raise
        if status != "finished:completed":
            raise NetworkError(f"The federated job failed: {self._reason(run_id)}")
        return read_results(out)

    def _reason(self, run_id: int) -> str:
        logs = self.cli.logs(run_id)
        errors = [m.group(1).strip() for m in re.finditer(r"Error: (.+)", logs)]
        privmed = [line.split("[privmed]", 1)[1].strip() for line in logs.splitlines()
                   if "[privmed]" in line]
        if errors:
            return errors[-1]
        lines = [line for line in logs.splitlines() if line.strip()]
        return (lines[-1].strip() if lines else "no log") + (
            f" (last progress: {privmed[-1]})" if privmed else "")


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def run_coordinator(heldout: Path, out: Path, *, host: str = "127.0.0.1", port: int = 9092,
                    certs: Path | None = None, insecure: bool = False, min_nodes: int = 2,
                    node_wait: float = 600.0, resume: bool = False,
                    model: str | None = None, rounds: int | None = None,
                    say: Callable[[str], None] = print, watch: Watch | None = None,
                    **settings: Any) -> dict:
    """``privmed coordinator``: serve the nodes on ``host:port`` (TLS and node
    authentication with ``certs`` from ``privmed certs``, plain text only when
    ``insecure``), wait up to ``node_wait`` s for ``min_nodes`` nodes, run the job
    (:func:`~privmed.federation.config.federation_job` of ``model``, ``rounds`` and
    ``settings``) evaluated on ``heldout`` and return its results; every process is
    stopped afterwards. Bad settings are refused (ConfigError) before anything starts."""
    from privmed.data.evalset import load_eval_split
    from privmed.federation.runtime.launcher import require_flower

    require_flower()
    if certs is not None and insecure:
        raise ConfigError("--insecure turns TLS and node authentication off: give --certs or "
                          "--insecure, not both.")
    if certs is None and not insecure:
        raise ConfigError("Give --certs (a folder from 'privmed certs') for TLS and node "
                          "authentication, or --insecure for plain text on a trusted network.")
    if certs is not None:
        from privmed.federation.runtime.certs import check_server_credentials

        check_server_credentials(certs)  # expired or mismatched: say so before any work
    elif host not in LOOPBACK:
        say(f"Warning: serving the nodes on {host} WITHOUT TLS or node authentication "
            "(--insecure).")
    load_eval_split(heldout)  # its test split, or all of a file without splits: readable
    job = federation_job(job_id_for(out, resume), model, rounds=rounds, min_nodes=min_nodes,
                         **settings)
    out.mkdir(parents=True, exist_ok=True)
    with ProcessGroup() as group:
        coord = Coordinator(group, out / "coordinator", host=host, port=port, certs=certs,
                            public=True, say=say)
        names = (" or ".join(f"{h}:{coord.port}" for h in coord.hosts) if certs
                 else f"<this host>:{coord.port} (WITHOUT TLS)")
        say(f"Coordinator listening on {host}:{coord.port} with {len(coord.names)} node keys "
            f"registered; start the nodes with 'privmed node --superlink {names} ...'.")
        coord.wait_for_nodes(min_nodes, node_wait, say=say)
        with watched(watch, job.rounds) as on_round:
            return coord.run(job, heldout, out, resume=resume, source=str(heldout),
                             node_wait=node_wait, on_round=on_round)


def job_id_for(out: Path, resume: bool) -> str:
    """A fresh id per job; the saved one when resuming (nodes key their replies by it)."""
    if resume:
        try:
            return json.loads((out / JOB_FILE).read_text(encoding="utf-8"))["job"]["job_id"]
        except (OSError, ValueError, KeyError):
            raise ConfigError(f"Nothing to resume: {out / JOB_FILE} is missing or unreadable."
                              ) from None
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", out.resolve().name).strip("-._")[:50] or "job"
    return f"{stem}-{time.strftime('%Y%m%dT%H%M%S')}"
