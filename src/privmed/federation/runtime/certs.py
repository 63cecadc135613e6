"""Credentials for a real deployment: a CA, the coordinator's TLS certificate and one
authentication key pair per node (Flower's TLS and SuperNode authentication).

Keys come from pyca ``cryptography`` (EC P-384). Everything is created fresh, never over
an existing file or through a symbolic link; private keys are readable by their owner
only (0600) in folders only the owner can enter (0700). Hand each hospital ``ca.crt`` and
its own ``nodes/NAME.key``; the coordinator keeps ``server.*`` and registers every
``nodes/*.pub``. The certificate names only the hosts the hospitals reach the coordinator
by: the coordinator's own processes talk to its SuperLink over loopback under a
throwaway certificate (:func:`loopback_tls`) that never leaves the coordinator.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from privmed.errors import ConfigError

_NODE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_PEM, _PKCS8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
LOOPBACK_HOSTS = ["127.0.0.1", "::1", "localhost"]


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode``; refuse an existing file or a link planted there
    (O_CREAT on an existing file would keep its owner and permissions)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; choose another folder.") from None
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), mode)  # the umask may have narrowed it; never widened
        fh.write(data)


def private_dir(path: Path) -> Path:
    """``path`` as a folder only its owner can enter (created or narrowed to 0700)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.is_symlink() or path.stat().st_uid != os.getuid():
        raise ConfigError(f"{path} is not a folder of this user's; choose another.")
    os.chmod(path, 0o700)
    return path


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _issue(out: Path, hosts: list[str], days: int, ca_name: str) -> None:
    """ca.crt/ca.key and server.pem/server.key for ``hosts`` in ``out``."""
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
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
              .issuer_name(name).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(start).not_valid_after(end)
              .add_extension(_san(hosts), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))
    none = serialization.NoEncryption()
    _write_new(out / "ca.crt", ca.public_bytes(_PEM), 0o644)
    _write_new(out / "ca.key", ca_key.private_bytes(_PEM, _PKCS8, none), 0o600)
    _write_new(out / "server.pem", server.public_bytes(_PEM), 0o644)
    _write_new(out / "server.key", server_key.private_bytes(_PEM, _PKCS8, none), 0o600)


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
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ConfigError(f"The certificates must be valid for at least one day, got {days!r}.")
    if (out / "ca.key").exists():
        raise ConfigError(f"{out} already holds a CA; choose another folder.")
    private_dir(out)
    _issue(out, hosts, days, "privmed federation CA")
    for name in nodes:
        add_node_key(out, name)
    return out


def add_node_key(out: str | Path, name: str) -> Path:
    """A node's authentication key pair (OpenSSH format, as Flower expects)."""
    if not _NODE_NAME.match(name):
        raise ConfigError(f"Node name '{name}' may hold only letters, digits, '.', '_' and '-'.")
    folder = private_dir(Path(out) / "nodes")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_new(folder / f"{name}.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()), 0o600)
    _write_new(folder / f"{name}.pub", key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH), 0o644)
    return folder / f"{name}.key"


def loopback_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and certificate for the coordinator's SuperLink on loopback
    (Flower's SuperNode authentication needs TLS there too); (ca.crt, server.pem,
    server.key), made anew at every start."""
    folder = private_dir(folder)
    for name in ("ca.crt", "ca.key", "server.pem", "server.key"):
        (folder / name).unlink(missing_ok=True)
    _issue(folder, LOOPBACK_HOSTS, 30, "privmed coordinator loopback CA")
    (folder / "ca.key").unlink()  # nothing else is ever signed with it
    return folder / "ca.crt", folder / "server.pem", folder / "server.key"


def check_private(path: Path, what: str) -> None:
    """Refuse a private key that others may read, as ssh does."""
    try:
        mode = path.stat().st_mode
    except OSError:
        raise ConfigError(f"The {what} {path} does not exist.") from None
    if mode & 0o077:
        raise ConfigError(f"The {what} {path} is readable by others (mode {mode & 0o777:o}); "
                          f"make it yours alone: chmod 600 {path}.")


def _load_cert(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"The {what} {path} does not exist.") from None
    except (OSError, ValueError):
        raise ConfigError(f"The {what} {path} is not a PEM certificate.") from None


def _check_dates(cert: x509.Certificate, path: Path, what: str) -> None:
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc <= now:
        raise ConfigError(f"The {what} {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                          "make new credentials with 'privmed certs'.")
    if cert.not_valid_before_utc > now:
        raise ConfigError(f"The {what} {path} is not valid before "
                          f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check the clock.")


def check_ca_cert(path: Path) -> None:
    """A node's --root-cert: a CA certificate that is valid now."""
    cert = _load_cert(path, "CA certificate")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(f"{path} is not a CA certificate; give the federation's ca.crt.")
    _check_dates(cert, path, "CA certificate")


def check_server_credentials(certs: Path) -> list[str]:
    """The coordinator's server.pem: valid now, issued by ca.crt, matching server.key;
    returns the names it is valid for (what the nodes must connect to)."""
    ca = _load_cert(certs / "ca.crt", "CA certificate")
    server = _load_cert(certs / "server.pem", "server certificate")
    _check_dates(ca, certs / "ca.crt", "CA certificate")
    _check_dates(server, certs / "server.pem", "server certificate")
    try:
        server.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(f"{certs / 'server.pem'} was not issued by {certs / 'ca.crt'}; "
                          "use one folder made by 'privmed certs'.") from None
    check_private(certs / "server.key", "server key")
    try:
        key = serialization.load_pem_private_key((certs / "server.key").read_bytes(), None)
    except (OSError, ValueError, TypeError):
        raise ConfigError(f"{certs / 'server.key'} is missing or not an unencrypted PEM "
                          "private key.") from None
    if key.public_key().public_bytes(_PEM, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != server.public_key().public_bytes(_PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ConfigError(f"{certs / 'server.key'} does not belong to {certs / 'server.pem'}.")
    try:
        san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + \
        san.get_values_for_type(x509.DNSName)
