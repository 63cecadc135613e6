"""The roles as commands: a node, a coordinator, and both on one machine (``federate``)."""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from privmed.errors import ConfigError, NetworkError
from privmed.federation.config import FederationConfig
from privmed.federation.launcher import (
    FlowerCli,
    ProcessGroup,
    flower_env,
    free_port,
    superlink_command,
    supernode_command,
    wait_for_port,
    wait_until,
    write_app,
)

JOB_FILE = "job.json"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _tail(log: Path, lines: int = 3) -> str:
    """The reason a Flower process gave: its 'Exit Code' paragraph, else its last lines."""
    try:
        text = _ANSI.sub("", log.read_text(encoding="utf-8", errors="replace")).splitlines()
    except OSError:
        return ""
    for i in range(len(text) - 1, -1, -1):
        if "Exit Code:" in text[i]:
            para = []
            for line in text[i + 1:]:
                if not line.strip() or line.startswith("For more information"):
                    break
                para.append(line.strip())
            if para:
                return " ".join(para)
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())


# ----------------------------------------------------------------------------- node

def run_node(data: str, *, superlink: str, ledger: Path | None, budget_epsilon: float | None,
             name: str | None = None, size: int | None = None, home: Path | None = None,
             root_cert: Path | None = None, auth_key: Path | None = None,
             connect_timeout: float | None = 300.0,
             say: Callable[[str], None] = print) -> None:
    """Load the site's data and ledger, then serve rounds through a SuperNode until it
    stops (Ctrl-C, or the SuperNode exits). A coordinator that cannot be reached for
    ``connect_timeout`` seconds (None: keep trying) ends the node with NetworkError."""
    from privmed.federation.node import SiteNode
    from privmed.federation.worker import NodeWorker, write_secret

    node = SiteNode(data, ledger=ledger, budget_epsilon=budget_epsilon, name=name, size=size)
    root_cert = root_cert.resolve() if root_cert is not None else None
    auth_key = auth_key.resolve() if auth_key is not None else None
    for path, what in ((root_cert, "CA certificate"), (auth_key, "authentication key")):
        if path is not None and not path.is_file():
            raise ConfigError(f"The {what} {path} does not exist.")
    home = Path(home or Path(tempfile.mkdtemp(prefix="privmed-node-"))).resolve()
    # A short path: Unix socket names are limited to ~100 bytes.
    sock_dir = Path(tempfile.mkdtemp(prefix="pmn-"))
    key = write_secret(home / "worker.key")

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        from privmed.federation.secure import handle_request, unpack

        answer = handle_request(node, request)
        if request.get("kind", "train") == "train":
            meta = unpack(answer["meta"])
            say(f"Round {request['round']}: {meta.get('status')}"
                + (f" ({meta['reason']})" if meta.get("reason") else ""))
        return answer

    worker = NodeWorker(sock_dir / "worker.sock", key, handle)
    config = {"worker": str(worker.address), "worker-key": str(home / "worker.key")}
    log = home / "supernode.log"
    try:
        with ProcessGroup() as group:
            proc = group.start("supernode", supernode_command(
                superlink, free_port(), config, root_cert, auth_key, connect_timeout),
                flower_env(home / "flwr"), log, new_session=False)
            worker.serve_in_thread()  # after the fork: no thread may run during one
            say(f"Node {node.name} ({node.num_examples} training images) is connecting to "
                f"{superlink}; Ctrl-C stops it.")
            while proc.poll() is None:
                time.sleep(0.5)
            reason = _tail(log) or f"see {log}"
            if "Connection attempt failed" in log.read_text(errors="replace") and \
                    "activate" not in reason:
                raise NetworkError(f"Could not reach the coordinator at {superlink} within "
                                   f"{connect_timeout:g} s; check the address and that "
                                   "'privmed coordinator' is running.")
            hint = (" Is this node's public key registered with the coordinator?"
                    if auth_key is not None else "")
            raise NetworkError(f"The node's SuperNode stopped (code {proc.returncode}): "
                               f"{reason}{hint}")
    finally:
        worker.close()


# ----------------------------------------------------------------------------- coordinator

class Coordinator:
    """A SuperLink plus the privmed ServerApp for one job, all stopped on exit."""

    def __init__(self, group: ProcessGroup, work: Path, *, host: str = "127.0.0.1",
                 port: int | None = None, certs: Path | None = None,
                 simulation: bool = False) -> None:
        certs = certs.resolve() if certs is not None else None
        work = work.resolve()
        self.group, self.work, self.certs = group, work, certs
        self.port = port or free_port()
        self.address = f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{self.port}"
        log = work / "superlink.log"
        proc = group.start("superlink", superlink_command(
            self.port, host, certs, simulation),
            flower_env(work / "flwr-link"), log)
        wait_for_port(self.port, proc, "SuperLink", log)
        self.cli = FlowerCli(work / "flwr-cli", self.address,
                             certs / "ca.crt" if certs else None)
        if certs is not None:
            for pub in sorted((certs / "nodes").glob("*.pub")):
                self.cli.register(pub)

    def wait_for_nodes(self, count: int, timeout: float, procs: list | None = None) -> None:
        def ready() -> bool:
            for p in procs or []:
                if p.poll() is not None:
                    raise NetworkError(f"A node stopped before connecting (code {p.returncode})"
                                       f"; see the logs in {self.work}.")
            return self.cli.online() >= count
        wait_until(ready, timeout, f"Fewer than {count} nodes came online within "
                                   f"{timeout:.0f} s; see the logs in {self.work}.")

    def run(self, job: FederationConfig, heldout: Path, out: Path, *, resume: bool,
            source: str, node_wait: float = 120.0,
            on_round: Callable[[dict], None] | None = None,
            simulation: dict[str, Any] | None = None) -> dict:
        """Submit the job and follow it to the end. ``simulation`` (sites, ledger_dir,
        budget_epsilon) runs it on Flower's simulation engine with one virtual node per
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
        try:
            while True:
                status = self.cli.status(run_id)
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


def node_process(data: Path, superlink: str, name: str, home: Path, ledger: Path | None,
                 budget: float | None) -> list[str]:
    cmd = [sys.executable, "-m", "privmed", "node", "--data", str(data), "--superlink",
           superlink, "--name", name, "--home", str(home)]
    if ledger is not None:
        cmd += ["--ledger", str(ledger)]
    if budget is not None:
        cmd += ["--budget-epsilon", str(budget)]
    return cmd


def run_local_federation(job: FederationConfig, site_paths: list[Path], heldout: Path,
                         out: Path, *, resume: bool, source: str,
                         budget_epsilon: float | None,
                         on_round: Callable[[dict], None] | None = None,
                         say: Callable[[str], None] = print) -> dict:
    """A SuperLink and one ``privmed node`` process per site on loopback, the job, and
    every process stopped afterwards (also on Ctrl-C or failure)."""
    import os

    with ProcessGroup() as group:
        coord = Coordinator(group, out / "coordinator")
        procs = []
        for i, path in enumerate(site_paths, start=1):
            home = out / "nodes" / f"site-{i}"
            ledger = home / "ledger.sqlite" if job.private else None
            procs.append(group.start(f"site-{i}", node_process(
                path, coord.address, f"site-{i}", home, ledger, budget_epsilon),
                dict(os.environ), home / "node.log"))
        say(f"Started a SuperLink on {coord.address} and {len(site_paths)} nodes "
            f"(logs in {out / 'nodes'}).")
        coord.wait_for_nodes(len(site_paths), 180.0, procs)
        return coord.run(job, heldout, out, resume=resume, source=source, on_round=on_round)


def run_simulation(job: FederationConfig, site_paths: list[Path], heldout: Path, out: Path, *,
                   resume: bool, source: str, budget_epsilon: float | None,
                   on_round: Callable[[dict], None] | None = None,
                   say: Callable[[str], None] = print) -> dict:
    """The same ServerApp and ClientApp on Flower's simulation engine (Ray): one virtual
    node per site, all in this machine's Ray actors."""
    with ProcessGroup() as group:
        coord = Coordinator(group, out / "coordinator", simulation=True)
        ledger_dir = (out / "nodes").resolve() if job.private else None
        if ledger_dir is not None:
            ledger_dir.mkdir(parents=True, exist_ok=True)
        say(f"Simulating {len(site_paths)} sites on Flower's simulation engine "
            f"(SuperLink {coord.address}).")
        sim = {"sites": [str(p.resolve()) for p in site_paths],
               "ledger_dir": str(ledger_dir) if ledger_dir else None,
               "budget_epsilon": budget_epsilon}
        return coord.run(job, heldout, out, resume=resume, source=source, on_round=on_round,
                         simulation=sim)
