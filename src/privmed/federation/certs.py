"""Credentials for a real deployment: a CA, the SuperLink's TLS certificate and one
authentication key pair per node (Flower's TLS and SuperNode authentication).

Keys come from pyca ``cryptography`` (EC P-384); private keys are written readable by
their owner only. Hand each hospital ``ca.crt`` and its own ``nodes/NAME.key``; the
coordinator keeps ``server.*`` and registers every ``nodes/*.pub``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from privmed.errors import ConfigError

_NODE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def provision(out: str | Path, *, hosts: list[str], nodes: list[str], days: int = 365) -> Path:
    """Write ca.crt/ca.key, server.pem/server.key for ``hosts`` and nodes/NAME.key/.pub."""
    out = Path(out)
    bad = [n for n in nodes if not _NODE_NAME.match(n)]
    if bad:
        raise ConfigError(f"Node names may hold only letters, digits, '.', '_' and '-': {bad}.")
    if len(set(nodes)) != len(nodes):
        raise ConfigError("Node names must be distinct.")
    if not hosts:
        raise ConfigError("Name at least one host (DNS name or IP) the coordinator is reached at.")
    if (out / "ca.key").exists():
        raise ConfigError(f"{out} already holds a CA; choose another folder.")
    (out / "nodes").mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "privmed federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(start).not_valid_after(end)
              .add_extension(_san(hosts), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    (out / "ca.crt").write_bytes(ca.public_bytes(pem))
    _write_private(out / "ca.key", ca_key.private_bytes(pem, pkcs8, none))
    (out / "server.pem").write_bytes(server.public_bytes(pem))
    _write_private(out / "server.key", server_key.private_bytes(pem, pkcs8, none))
    for name in nodes:
        add_node_key(out, name)
    return out


def add_node_key(out: str | Path, name: str) -> Path:
    """A node's authentication key pair (OpenSSH format, as Flower expects)."""
    if not _NODE_NAME.match(name):
        raise ConfigError(f"Node name '{name}' may hold only letters, digits, '.', '_' and '-'.")
    folder = Path(out) / "nodes"
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(folder / f"{name}.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    (folder / f"{name}.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return folder / f"{name}.key"
