"""Starting, watching and stopping Flower's processes for the user.

Flower housekeeping lives here: every process gets its own Flower home
(``FLWR_HOME``), telemetry and update checks are off, runtime dependency installation
is off (apps import privmed from this environment), ports are chosen free on loopback
(a coordinator's SuperLink never listens elsewhere: ``fleet_gateway`` faces the nodes),
and every process starts in its own session so that stopping it also stops the
SuperExec and ClientApp/ServerApp children it spawned. :class:`ProcessGroup` stops
everything it started on exit, on an exception and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from privmed.errors import ConfigError, NetworkError

APP_NAME = "privmed"
FEDERATION = "privmed"
# Flower's SuperExec asks for new tasks every second by default and every message waits
# for it; 0.25 s trims that without the CPU that faster polling costs on small machines.
TASK_POLL_INTERVAL = "0.25"

_APP_PYPROJECT = """\
# Written by privmed: a Flower app whose components live in the installed privmed package.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "privmed-federation"
version = "1.0.0"
description = "privmed federated training"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "privmed"

[tool.flwr.app.components]
serverapp = "privmed.federation.flower_apps:server_app"
clientapp = "privmed.federation.flower_apps:client_app"

[tool.flwr.app.config]
job-file = ""
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def flower_env(home: Path) -> dict[str, str]:
    """Environment for one Flower process with its own home and nothing phoning out."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_SUPEREXEC_TASK_POLL_INTERVAL=TASK_POLL_INTERVAL,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def _descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when privmed dies, even by SIGKILL (Linux), so
    that a crashed coordinator or node leaves no Flower process behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def write_app(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(_APP_PYPROJECT, encoding="utf-8")
    return directory


class ProcessGroup:
    """Processes started for one command; all stopped when the ``with`` block ends."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen, IO[Any]]] = []

    def __enter__(self) -> ProcessGroup:
        self._old = signal.getsignal(signal.SIGTERM)
        # A SIGTERM to privmed becomes KeyboardInterrupt, so the cleanup below runs.
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
        signal.signal(signal.SIGTERM, self._old)

    def start(self, name: str, cmd: Sequence[str], env: dict[str, str], log: Path,
              new_session: bool = True) -> subprocess.Popen:
        """Start ``cmd``; ``new_session=False`` keeps it in our process group, so whoever
        kills our group kills it too (a node's SuperNode dies with the node)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log, "ab")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(list(cmd), env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=new_session,
                                preexec_fn=_die_with_parent)
        proc.own_group = new_session  # type: ignore[attr-defined]
        self.procs.append((name, proc, fh))
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
        # Flower's SuperExec and its Server/ClientApps start sessions of their own: find
        # them first, they are signalled after the process itself.
        descendants = _descendants(proc.pid)
        try:
            ProcessGroup._stop_one(proc, sig, wait)
        finally:
            for pid in descendants:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)

    @staticmethod
    def _stop_one(proc: subprocess.Popen, sig: int, wait: float) -> None:
        if proc.poll() is not None:
            return
        try:
            if not getattr(proc, "own_group", True):
                proc.send_signal(sig)
                proc.wait(timeout=wait)
                return
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            if getattr(proc, "own_group", True):
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait()
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for _, proc, fh in reversed(self.procs):
            self.stop(proc)
            fh.close()
        self.procs.clear()


def connect_host(host: str) -> str:
    """Where a process on this machine reaches a server bound to ``host``: loopback for
    the wildcard addresses, else the address itself (what Flower does for its SuperExec)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def wait_for_port(host: str, port: int, proc: subprocess.Popen, what: str, log: Path,
                  timeout: float = 60.0, say: Any = None) -> None:
    """Until ``proc`` accepts connections on ``host:port`` (the address it was told to
    bind, or loopback for a wildcard one)."""
    address = connect_host(host)
    deadline = time.monotonic() + timeout
    told = time.monotonic()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NetworkError(f"The {what} exited at start-up (code {proc.returncode}); "
                               f"see {log}.")
        try:
            socket.create_connection((address, port), 0.5).close()
            return
        except OSError:
            if say is not None and time.monotonic() - told > 15:
                say(f"Still waiting for the {what} to open {host_port(address, port)}...")
                told = time.monotonic()
            time.sleep(0.1)
    raise NetworkError(f"The {what} did not open {host_port(address, port)} within "
                       f"{timeout:.0f} s; see {log}.")


def superlink_command(port: int, host: str = "127.0.0.1",
                      tls: tuple[Path, Path, Path] | None = None,
                      simulation: bool = False) -> list[str]:
    """``tls``: (CA certificate, certificate, key); with it SuperNodes must authenticate
    with a registered key, without it the SuperLink speaks plain HTTP."""
    # No --database: the SuperLink's state lives in memory. privmed's own checkpoint
    # carries a job across restarts, and a persisted SuperLink would list the nodes of
    # the crashed run as members of the new one.
    cmd = [_bin("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if simulation:
        cmd.append("--simulation")
    if tls is None:
        return [*cmd, "--insecure"]
    ca, cert, key = tls
    return [*cmd, "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert),
            "--ssl-keyfile", str(key), "--enable-supernode-auth"]


def gateway_command(host: str, port: int, upstream: str, upstream_ca: Path | None,
                    certs: Path | None) -> list[str]:
    """The public Fleet-only listener in front of the SuperLink (``fleet_gateway``)."""
    cmd = [sys.executable, "-m", "privmed.federation.fleet_gateway", "--host", host,
           "--port", str(port), "--upstream", upstream]
    if upstream_ca is not None:
        cmd += ["--upstream-ca", str(upstream_ca)]
    if certs is not None:
        cmd += ["--certfile", str(certs / "server.pem"), "--keyfile", str(certs / "server.key")]
    return cmd


def supernode_command(superlink: str, port: int, node_config: dict[str, Any],
                      root_cert: Path | None = None, auth_key: Path | None = None,
                      connect_timeout: float | None = None) -> list[str]:
    config = " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())
    cmd = [_bin("flower-supernode"), "--superlink", superlink, "--port", str(port),
           "--node-config", config]
    if connect_timeout is not None:
        cmd += ["--max-wait-time", str(connect_timeout)]
    if root_cert is None:  # privmed node refuses this unless asked for with --insecure
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(root_cert)]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    return cmd


class FlowerCli:
    """The ``flwr`` command line, talking to one SuperLink through its own Flower home."""

    def __init__(self, home: Path, address: str, root_cert: Path | None = None) -> None:
        self.env = flower_env(home)
        entry = f'address = "{address}"\n' + (
            f'root-certificates = "{root_cert}"\n' if root_cert else "insecure = true\n")
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n{entry}',
            encoding="utf-8")

    def _run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([_bin("flwr"), *args], env=self.env, capture_output=True,
                                  text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise NetworkError(f"'flwr {args[0]}' did not answer within {timeout:.0f} s.") from None

    def _json(self, *args: str) -> dict:
        proc = self._run(*args, "--format", "json")
        try:
            return json.loads(proc.stdout)
        except json.JSONDecodeError:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise NetworkError(f"'flwr {args[0]}' failed: "
                               f"{detail[-1] if detail else 'no output'}.") from None

    def nodes(self) -> list[dict]:
        return list(self._json("supernode", "list", FEDERATION).get("nodes", []))

    def online(self) -> int:
        try:
            return sum(1 for n in self.nodes() if n.get("status") == "online")
        except NetworkError:
            return 0

    def register(self, public_key: Path) -> int:
        out = self._json("supernode", "register", str(public_key), FEDERATION)
        if not out.get("success", False):
            raise NetworkError(f"Registering {public_key} failed: {out}.")
        return int(out["node-id"])

    def submit(self, app: Path, run_config: dict[str, Any],
               federation_config: dict[str, Any] | None = None) -> int:
        config = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        extra = []
        if federation_config:
            extra = ["--federation-config",
                     " ".join(f"{k}={json.dumps(v)}" for k, v in federation_config.items())]
        out = self._json("run", str(app), FEDERATION, "--run-config", config, *extra)
        if "run-id" not in out:
            raise NetworkError(f"The SuperLink did not accept the job: {out}.")
        return int(out["run-id"])

    def status(self, run_id: int) -> str:
        runs = self._json("list", FEDERATION, "--run-id", str(run_id)).get("runs", [])
        return str(runs[0].get("status", "unknown")) if runs else "unknown"

    def logs(self, run_id: int) -> str:
        return self._run("log", str(run_id), FEDERATION, "--show").stdout

    def stop_run(self, run_id: int) -> None:
        self._run("stop", str(run_id), FEDERATION, timeout=30)


def wait_until(predicate: Any, timeout: float, message: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise NetworkError(message)
        time.sleep(poll)


def require_flower(simulation: bool = False) -> None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ConfigError("Federated training needs Flower: pip install flwr==1.41.0.") from None
    if simulation:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("Simulation needs Ray: pip install 'privmed[simulation]'."
                              ) from None
