"""A node's SuperNode until the coordinator admits it: started, watched, restarted while
the refusal may pass, else one sentence saying why it cannot connect.

Flower's SuperNode retries an unreachable SuperLink by itself (``--max-wait-time``) but
exits at once when the SuperLink refuses to activate it (HTTP 412, "Failed to activate
SuperNode"). That refusal is often transient: the node started before the coordinator
registered its key, or an earlier connection of the same node still counts as online
(Flower keeps it so for up to a minute after its last heartbeat). Flower gives the node no
way to tell those from a key that was never registered, so :class:`SuperNodeLink`
restarts the SuperNode with backoff until the node's connect timeout, and only then
says the key was refused. TLS failures and a missing key are never transient.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from privmed.errors import NetworkError
from privmed.federation.runtime.launcher import flower_env, supernode_command
from privmed.processes import ProcessGroup, free_port

ADMITTED = "SuperNode ID:"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MAX_BACKOFF = 30.0


def exit_reason(text: str) -> str:
    """The reason Flower gave in its last 'Exit Code' paragraph, else the last lines."""
    lines = _ANSI.sub("", text).splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if "Exit Code:" in lines[i]:
            para = []
            for line in lines[i + 1:]:
                if not line.strip() or line.startswith("For more information"):
                    break
                para.append(line.strip())
            if para:
                return " ".join(para)
    return " | ".join(line.strip() for line in lines[-3:] if line.strip())


def classify(text: str, superlink: str, timeout: float | None) -> tuple[str, str]:
    """(kind, sentence) for a SuperNode that stopped before being admitted; kind is
    'refused' (may pass: retried), 'unreachable', 'tls', 'needs-key' or 'other'."""
    reason = exit_reason(text)
    if "[code: 2004]" in reason or "Failed to activate SuperNode" in reason:
        waited = f" for {timeout:g} s" if timeout else ""
        return "refused", (
            f"The coordinator at {superlink} refused this node's key{waited}: it is not "
            "registered there (the coordinator registers the nodes/*.pub of its --certs "
            "folder when it starts), or an earlier connection of this node still counts as "
            "online.")
    if "[code: 2001]" in reason:
        return "needs-key", ("The coordinator requires node authentication: start the node "
                             "with --auth-key and the NAME.key 'privmed certs' made for it.")
    verify = re.search(r"certificate verify failed: ([^(]+)", reason)
    if verify:
        return "tls", (
            f"The coordinator's TLS certificate was rejected ({verify.group(1).strip()}): "
            f"check that --root-cert is the federation's ca.crt, that {superlink} names a "
            "host in the coordinator's certificate, and that it has not expired.")
    if "WRONG_VERSION_NUMBER" in reason or "SSL" in reason:
        return "tls", (f"No TLS connection to {superlink} ({reason.split('] ')[-1][:120]}): "
                       "is the coordinator running with --certs?")
    if "Giving up reconnection" in _ANSI.sub("", text) or "Connection refused" in reason \
            or "503" in reason or "timed out" in reason.lower():
        return "unreachable", unreachable(superlink, timeout)
    return "other", f"The node's SuperNode stopped: {reason or 'no reason given'}."


def unreachable(superlink: str, timeout: float | None) -> str:
    waited = f" within {timeout:g} s" if timeout else ""
    return (f"Could not reach the coordinator at {superlink}{waited}; check the address and "
            "that 'privmed coordinator' is running.")


def _read(log: Path, offset: int) -> str:
    try:
        with open(log, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


class SuperNodeLink:
    """Starts the node's SuperNode in ``group`` until the coordinator admits it."""

    def __init__(self, group: ProcessGroup, superlink: str, node_config: dict[str, Any],
                 home: Path, root_cert: Path | None, auth_key: Path | None,
                 say: Callable[[str], None] = print) -> None:
        self.group, self.superlink, self.config = group, superlink, node_config
        self.root_cert, self.auth_key, self.say = root_cert, auth_key, say
        self.home, self.log, self.offset = home, home / "supernode.log", 0

    def admit(self, timeout: float | None) -> subprocess.Popen:
        """The running SuperNode once admitted; NetworkError with the reason if the
        coordinator cannot be reached, or keeps refusing this node, for ``timeout`` s
        (None: keep trying). Each SuperNode gets the whole ``timeout`` as Flower's
        --max-wait-time, which also bounds a lost connection after admission."""
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff, refused = 2.0, ""
        while True:
            self.offset = self.log.stat().st_size if self.log.exists() else 0
            proc = self.group.start("supernode", supernode_command(
                self.superlink, free_port(), self.config, self.root_cert, self.auth_key,
                timeout), flower_env(self.home / "flwr"), self.log, new_session=False)
            told = time.monotonic()
            while proc.poll() is None:
                if ADMITTED in _read(self.log, self.offset):
                    return proc
                now = time.monotonic()
                if deadline is not None and now > deadline:
                    ProcessGroup.stop(proc)
                    raise NetworkError(refused or unreachable(self.superlink, timeout))
                if now - told > 30:
                    self.say(f"Still trying to reach the coordinator at {self.superlink}"
                             + (f" (giving up in {deadline - now:.0f} s)." if deadline else "."))
                    told = now
                time.sleep(0.25)
            text = _read(self.log, self.offset)
            if ADMITTED in text:
                return proc  # admitted, then stopped at once: the caller says why
            kind, sentence = classify(text, self.superlink, timeout)
            if kind != "refused" or (deadline is not None
                                     and time.monotonic() + backoff > deadline):
                raise NetworkError(sentence)
            refused = sentence
            self.say("The coordinator does not accept this node's key yet (not registered, "
                     "or an earlier connection still counts as online); trying again in "
                     f"{backoff:.0f} s.")
            time.sleep(backoff)
            backoff = min(2 * backoff, _MAX_BACKOFF)

    def stopped(self, proc: subprocess.Popen) -> str:
        """Why an admitted SuperNode stopped, as one sentence."""
        kind, sentence = classify(_read(self.log, self.offset), self.superlink, None)
        if kind == "unreachable":
            return (f"Lost the coordinator at {self.superlink}: the job may have ended; "
                    "restart the node when the coordinator is back.")
        return sentence.replace("The node's SuperNode stopped:",
                                f"The node's SuperNode stopped (code {proc.returncode}):")
