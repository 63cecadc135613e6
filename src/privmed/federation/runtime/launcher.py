"""Flower's commands for the user: the SuperLink, the SuperNodes, the gateway, ``flwr``.

Flower housekeeping lives here: every process gets its own Flower home
(``FLWR_HOME``), telemetry and update checks are off, runtime dependency installation
is off (apps import privmed from this environment), and a coordinator's SuperLink never
listens beyond loopback (``fleet_gateway`` faces the nodes). Starting, waiting for and
stopping the processes is ``privmed.processes``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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
serverapp = "privmed.federation.runtime.flower:server_app"
clientapp = "privmed.federation.runtime.flower:client_app"

[tool.flwr.app.config]
job-file = ""
"""




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






def write_app(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(_APP_PYPROJECT, encoding="utf-8")
    return directory










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
    cmd = [sys.executable, "-m", "privmed.federation.runtime.fleet_gateway", "--host", host,
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
