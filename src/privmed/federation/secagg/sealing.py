"""What the protocol's messages carry: shares encrypted to one peer (AES-GCM under an
HKDF key from an X25519 agreement, bound to sender, recipient, kind and instance),
commitments to self-mask seeds and to every share, and checks of public keys."""

from __future__ import annotations

import hashlib
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privmed.errors import PrivmedError

SHARE_BYTES = 4 + 66 + 16  # x (4 bytes), y (< 2^521) and the commitment's blinding r

Share = tuple[int, int, bytes]  # (x, y, r): a Shamir share and its commitment's blinding


class ProtocolError(PrivmedError):
    """A message breaks the protocol (the node refuses, or the sender is excluded)."""

    exit_code = 5


def share_key(own_c: object, peer_c_pk: bytes, run_id: bytes) -> bytes:
    shared = own_c.exchange(X25519PublicKey.from_public_bytes(peer_c_pk))  # type: ignore[attr-defined]
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=run_id,
                info=b"privmed secagg share encryption").derive(shared)


def aad(kind: str, sender: int, recipient: int, instance: int) -> bytes:
    return f"{kind}|{sender}|{recipient}|{instance}".encode()


def commit(run_id: bytes, instance: int, node: int, b: bytes) -> bytes:
    """Binding commitment to a self-mask seed (hiding: ``b`` is 256 random bits)."""
    return hashlib.sha256(b"privmed secagg b|" + run_id + f"|{instance}|{node}|".encode()
                          + b).digest()


def share_commitment(run_id: bytes, kind: str, instance: int, dealer: int,
                     share: Share) -> bytes:
    """The dealer's commitment to one share, published before anything is revealed, so
    that the coordinator checks every revealed share on its own: a holder that alters
    its share is left out, and no search over subsets of shares is needed."""
    x, y, r = share
    return hashlib.sha256(b"privmed secagg share|" + run_id + f"|{kind}|{instance}|{dealer}|"
                          .encode() + x.to_bytes(4, "big") + y.to_bytes(66, "big")
                          + r).digest()


def with_blinding(shares: list[tuple[int, int]]) -> list[Share]:
    return [(x, y, secrets.token_bytes(16)) for x, y in shares]


def encode_shares(shares: list[Share]) -> bytes:
    return b"".join(x.to_bytes(4, "big") + y.to_bytes(66, "big") + r for x, y, r in shares)


def decode_shares(raw: bytes, count: int) -> list[Share]:
    if len(raw) != count * SHARE_BYTES:
        raise ProtocolError("A share message has the wrong size.")
    return [(int.from_bytes(raw[i:i + 4], "big"), int.from_bytes(raw[i + 4:i + 70], "big"),
             bytes(raw[i + 70:i + SHARE_BYTES])) for i in range(0, len(raw), SHARE_BYTES)]


def valid_public_key(key: object) -> bool:
    """A 32-byte X25519 public key that agreement accepts (not a low-order point, which
    would make every peer's key setup fail)."""
    if not isinstance(key, bytes) or len(key) != 32:
        return False
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(key))
    except ValueError:
        return False
    return True


def seal(key: bytes, plain: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(key).encrypt(nonce, plain, aad)


def open_sealed(key: bytes, blob: object, aad: bytes) -> bytes:
    if not isinstance(blob, bytes):
        raise ProtocolError("A share is not a ciphertext.")
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], aad)
    except (InvalidTag, ValueError):
        raise ProtocolError("A share failed authentication (tampered or misrouted).") from None
