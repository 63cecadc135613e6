"""The secure-aggregation protocol, transport-free (Bonawitz et al. 2017, per-run keys).

Setup, once per run (two exchanges): every node advertises two X25519 public keys, one
to encrypt shares to peers (``c``) and one for pairwise masks (``s``); the coordinator
relays the roster; every node Shamir-shares its mask key ``s`` t-of-n, encrypting each
share to its recipient (AES-GCM under an HKDF key from the ``c`` agreement), and the
coordinator routes the ciphertexts, which it cannot read.

Each round (one extra exchange): a node encodes its update in the ring, adds a fresh
self mask ``PRG(b)`` and the pairwise masks ``±PRG(s_ij, round)`` for every active
peer, and sends it with encrypted shares of ``b``. The coordinator then asks the
survivors for the shares of ``b`` of every survivor and of ``s`` of every node that
dropped, removes those masks and learns only the sum.

A node never reveals both kinds of share of one peer: once a peer is reported dropped
its mask key is revealed, so the peer may never be active again (every node refuses a
round that lists it). A round with fewer than ``threshold`` unmasking replies cannot be
recovered: :class:`RecoveryError`, never a silent skip.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privmed.errors import PrivmedError
from privmed.federation.secagg import masking, shamir
from privmed.federation.secagg.encoding import FixedPoint


class ProtocolError(PrivmedError):
    """A message breaks the protocol (the node refuses, or the sender is excluded)."""

    exit_code = 5


class RecoveryError(PrivmedError):
    """Too few nodes answered to remove the masks: the round cannot be recovered."""

    exit_code = 5


@dataclass(frozen=True)
class Params:
    run_id: bytes
    threshold: int
    encoding: FixedPoint = field(default_factory=FixedPoint)


def _share_key(own_c: object, peer_c_pk: bytes, run_id: bytes) -> bytes:
    shared = own_c.exchange(X25519PublicKey.from_public_bytes(peer_c_pk))  # type: ignore[attr-defined]
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=run_id,
                info=b"privmed secagg share encryption").derive(shared)


def _aad(kind: str, sender: int, recipient: int, round_no: int) -> bytes:
    return f"{kind}|{sender}|{recipient}|{round_no}".encode()


def _seal(key: bytes, share: tuple[int, int], aad: bytes) -> bytes:
    nonce = secrets.token_bytes(12)
    x, y = share
    plain = x.to_bytes(4, "big") + y.to_bytes(66, "big")
    return nonce + AESGCM(key).encrypt(nonce, plain, aad)


def _open(key: bytes, blob: bytes, aad: bytes) -> tuple[int, int]:
    try:
        plain = AESGCM(key).decrypt(blob[:12], blob[12:], aad)
    except (InvalidTag, ValueError):
        raise ProtocolError("A share failed authentication (tampered or misrouted).") from None
    return int.from_bytes(plain[:4], "big"), int.from_bytes(plain[4:], "big")


class SecAggNode:
    """One node's side. Holds its secrets in memory only."""

    def __init__(self, node_id: int, params: Params) -> None:
        self.id, self.params = node_id, params
        self._c, self.c_pk = masking.new_keypair()
        self._s, self.s_pk = masking.new_keypair()
        self.roster: dict[int, dict[str, bytes]] = {}
        self._s_shares: dict[int, tuple[int, int]] = {}  # peers' mask-key shares held here
        self._b_revealed: set[tuple[int, int]] = set()  # (peer, round) whose b we revealed
        self.dropped: set[int] = set()  # peers whose mask key was revealed: never again

    def to_state(self) -> dict[str, object]:
        """Everything this node holds, for a host that keeps it between messages (Flower's
        per-node ``Context.state`` in simulation). It contains the node's secret keys."""
        return {"id": self.id, "run_id": self.params.run_id, "threshold": self.params.threshold,
                "c": masking.private_bytes(self._c), "s": masking.private_bytes(self._s),
                "roster": self.roster, "s_shares": {k: list(v) for k, v in self._s_shares.items()},
                "b_revealed": [list(x) for x in sorted(self._b_revealed)],
                "dropped": sorted(self.dropped)}

    @classmethod
    def from_state(cls, state: dict, encoding: FixedPoint) -> SecAggNode:
        node = cls.__new__(cls)
        node.id = int(state["id"])
        node.params = Params(run_id=state["run_id"], threshold=int(state["threshold"]),
                             encoding=encoding)
        node._c, node._s = masking.load_private(state["c"]), masking.load_private(state["s"])
        node.c_pk = masking.public_bytes(node._c)
        node.s_pk = masking.public_bytes(node._s)
        node.roster = {int(k): v for k, v in state["roster"].items()}
        node._s_shares = {int(k): (int(v[0]), int(v[1])) for k, v in state["s_shares"].items()}
        node._b_revealed = {(int(a), int(b)) for a, b in state["b_revealed"]}
        node.dropped = {int(x) for x in state["dropped"]}
        return node

    def advertise(self) -> dict[str, bytes]:
        return {"c_pk": self.c_pk, "s_pk": self.s_pk}

    def _key(self, peer: int) -> bytes:
        return _share_key(self._c, self.roster[peer]["c_pk"], self.params.run_id)

    def share_keys(self, roster: dict[int, dict[str, bytes]], threshold: int | None = None
                   ) -> dict[int, bytes]:
        """Check the roster, then send each peer its encrypted share of our mask key.

        ``threshold`` may be fixed only now, once the roster's size is known."""
        if threshold is not None:
            if not 2 <= threshold <= len(roster):
                raise ProtocolError(f"Threshold {threshold} is impossible for a roster of "
                                    f"{len(roster)} nodes.")
            self.params = replace(self.params, threshold=threshold)
        if roster.get(self.id) != self.advertise():
            raise ProtocolError("The roster does not hold this node's own keys.")
        if len(roster) < self.params.threshold:
            raise ProtocolError(f"The roster has {len(roster)} nodes, fewer than the "
                                f"threshold {self.params.threshold}.")
        self.roster = dict(roster)
        ids = sorted(roster)
        shares = shamir.share(masking.private_bytes(self._s), self.params.threshold, len(ids))
        return {peer: _seal(self._key(peer), shares[k], _aad("s", self.id, peer, 0))
                for k, peer in enumerate(ids)}

    def receive_key_shares(self, incoming: dict[int, bytes]) -> None:
        for sender, blob in incoming.items():
            if sender not in self.roster:
                raise ProtocolError(f"A share came from node {sender}, not on the roster.")
            self._s_shares[sender] = _open(self._key(sender), blob,
                                           _aad("s", sender, self.id, 0))

    def masked_input(self, round_no: int, active: list[int], update: np.ndarray
                     ) -> dict[str, object]:
        """This round's masked, encoded update and encrypted shares of its self mask."""
        active = sorted(set(active))
        if self.id not in active or not set(active) <= set(self.roster):
            raise ProtocolError("The round's active set is not part of this run's roster.")
        if set(active) & self.dropped:
            raise ProtocolError("The round lists a node whose mask key was already revealed.")
        if len(active) < self.params.threshold:
            raise ProtocolError("Fewer active nodes than the threshold: refusing to mask.")
        enc = self.params.encoding
        b = secrets.token_bytes(32)
        b_shares = shamir.share(b, self.params.threshold, len(active))
        sealed = {peer: _seal(self._key(peer), b_shares[k], _aad("b", self.id, peer, round_no))
                  for k, peer in enumerate(active)}
        seeds = {peer: masking.pair_seed(self._s, self.roster[peer]["s_pk"], self.params.run_id)
                 for peer in active if peer != self.id}
        y = masking.masked(enc.encode(update), b, seeds, self.id, round_no, enc.modulus_bits)
        return {"y": y, "b_shares": sealed}

    def unmask(self, round_no: int, survivors: list[int], dropped: list[int],
               b_shares: dict[int, bytes]) -> dict[str, dict[int, tuple[int, int]]]:
        """Shares of ``b`` of every survivor and of ``s`` of every dropped node."""
        surv, drop = set(survivors), set(dropped)
        if surv & drop or self.id not in surv:
            raise ProtocolError("A node cannot be both a survivor and dropped.")
        if surv & self.dropped:
            raise ProtocolError("A survivor's mask key was revealed earlier.")
        if any((peer, round_no) in self._b_revealed for peer in drop):
            raise ProtocolError("This node already revealed a self-mask share of a node now "
                                "reported dropped.")
        if len(surv) < self.params.threshold:
            raise ProtocolError(f"Only {len(surv)} survivors, fewer than the threshold "
                                f"{self.params.threshold}: refusing to unmask.")
        if set(b_shares) != surv:
            raise ProtocolError("The unmasking request lacks shares of some survivors.")
        out_b = {peer: _open(self._key(peer), blob, _aad("b", peer, self.id, round_no))
                 for peer, blob in b_shares.items()}
        self._b_revealed.update((peer, round_no) for peer in surv)
        self.dropped |= drop
        return {"b": out_b, "s": {peer: self._s_shares[peer] for peer in drop}}


class SecAggServer:
    """The coordinator's side: routes ciphertexts and removes masks; sees only the sum."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.roster: dict[int, dict[str, bytes]] = {}
        self.dropped: set[int] = set()

    def make_roster(self, adverts: dict[int, dict[str, bytes]]) -> dict[int, dict[str, bytes]]:
        good = {n: a for n, a in adverts.items()
                if isinstance(a, dict) and {len(a.get("c_pk", b"")), len(a.get("s_pk", b""))}
                == {32}}
        if len(good) < self.params.threshold:
            raise RecoveryError(f"Only {len(good)} nodes completed key setup; the threshold is "
                                f"{self.params.threshold}.")
        self.roster = good
        return good

    @staticmethod
    def route(outgoing: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """{sender: {recipient: blob}} -> {recipient: {sender: blob}}."""
        inbox: dict[int, dict[int, bytes]] = {}
        for sender, blobs in outgoing.items():
            for recipient, blob in blobs.items():
                inbox.setdefault(recipient, {})[sender] = blob
        return inbox

    def active(self) -> list[int]:
        return sorted(set(self.roster) - self.dropped)

    def collect(self, active: list[int], inputs: dict[int, dict[str, object]], length: int
                ) -> tuple[list[int], list[int], dict[int, str]]:
        """Survivors (well-formed inputs), dropped nodes, and why each was excluded."""
        reasons: dict[int, str] = {}
        survivors = []
        for node in active:
            msg = inputs.get(node)
            if msg is None:
                reasons[node] = "sent no masked input"
                continue
            y = msg.get("y")
            if not isinstance(y, np.ndarray) or y.dtype != np.uint64 or y.shape != (length,):
                reasons[node] = "sent a malformed or wrong-length masked vector"
                continue
            if not isinstance(msg.get("b_shares"), dict) or set(msg["b_shares"]) != set(active):
                reasons[node] = "sent shares for the wrong set of nodes"
                continue
            survivors.append(node)
        dropped = [n for n in active if n not in survivors]
        if len(survivors) < self.params.threshold:
            raise RecoveryError(f"Only {len(survivors)} of {len(active)} nodes sent a usable "
                                f"masked input; the threshold is {self.params.threshold}.")
        return survivors, dropped, reasons

    def unmask(self, round_no: int, inputs: dict[int, dict[str, object]], survivors: list[int],
               dropped: list[int], replies: dict[int, dict[str, dict[int, tuple[int, int]]]],
               length: int) -> np.ndarray:
        """The decoded sum of the survivors' updates."""
        enc, t = self.params.encoding, self.params.threshold
        if len(replies) < t:
            raise RecoveryError(f"Only {len(replies)} nodes answered the unmasking request; "
                                f"{t} are needed. The round is discarded.")
        total = np.zeros(length, dtype=np.uint64)
        for node in survivors:
            total = enc.add(total, inputs[node]["y"])  # type: ignore[arg-type]
        for node in survivors:
            b = self._recover(node, "b", replies)
            total = enc.sub(total, masking.prg(b, round_no, length, enc.modulus_bits))
        for node in dropped:
            key = masking.load_private(self._recover(node, "s", replies))
            for peer in survivors:
                seed = masking.pair_seed(key, self.roster[peer]["s_pk"], self.params.run_id)
                stream = masking.prg(seed, round_no, length, enc.modulus_bits)
                # peer added +PRG for a higher id, -PRG for a lower one: undo it
                total = enc.sub(total, stream) if node > peer else enc.add(total, stream)
        self.dropped |= set(dropped)
        return enc.decode(total)

    def _recover(self, node: int, kind: str,
                 replies: dict[int, dict[str, dict[int, tuple[int, int]]]]) -> bytes:
        shares = [r[kind][node] for r in replies.values() if node in r.get(kind, {})]
        if len(shares) < self.params.threshold:
            raise RecoveryError(f"Too few shares to remove node {node}'s mask; the round is "
                                "discarded.")
        return shamir.recover(shares[: self.params.threshold])
