"""The secure-aggregation protocol, transport-free (Bonawitz et al. 2017), with one-time
mask keys.

Key setup (two exchanges, once per ``instances`` masked sums): every node advertises
an X25519 public key ``c`` to encrypt shares to its peers and ``instances`` one-time
X25519 public keys ``s_1 .. s_K`` for pairwise masks; the coordinator relays the
roster; every node Shamir-shares each one-time private key ``s_k`` t-of-n, encrypting
each peer's shares to it (AES-GCM under an HKDF key from the ``c`` agreement), and the
coordinator routes the ciphertexts, which it cannot read.

Each masked sum (an *instance* ``k``: one round, or one retry of a round) uses key
``s_k`` and nothing else: a node adds a fresh self mask ``PRG(b)`` and the pairwise masks
``±PRG(s_ij,k)`` for every active peer, sends the masked vector with a commitment to
``b`` and encrypted shares of ``b``, then forgets ``s_k``'s private half. The coordinator
asks the survivors for the shares of ``b`` of every survivor and of ``s_k`` of every node
that dropped, checks every recovered secret (``b`` against its commitment, ``s_k``
against its public key), removes the masks, checks the sum lies within what the
survivors' clipped vectors can add up to, and learns only the sum.

Why one-time keys: with a pairwise key kept for a whole run, a node that survived one
round (its ``b`` rebuilt) and dropped in a later one (its ``s`` rebuilt) had every
earlier masked vector opened. Now each key masks exactly one vector, and for that
vector every node reveals either ``b`` shares or ``s`` shares of a peer, never both; no
sequence of dropouts, retries or resumes combines secrets of two instances. A node may
come back after it dropped: its later instances use keys never revealed.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field, replace

import numpy as np

from privmed.errors import ConfigError, PrivmedError
from privmed.federation.secagg import masking, sealing, shamir
from privmed.federation.secagg.encoding import FixedPoint
from privmed.federation.secagg.sealing import ProtocolError

__all__ = ["Params", "ProtocolError", "RecoveryError", "SecAggNode", "SecAggServer",
           "check_threshold"]

MAX_INSTANCES = 256  # one-time keys per key setup: bounds the setup messages
_MAX_TRIES = 2000  # subsets of shares tried to get past corrupted ones
_KIND = {"b": "self mask", "s": "mask key"}


class RecoveryError(PrivmedError):
    """Too few nodes answered, or their secrets did not check out: the sum is not
    released."""

    exit_code = 5


@dataclass(frozen=True)
class Params:
    run_id: bytes
    threshold: int
    encoding: FixedPoint = field(default_factory=FixedPoint)
    instances: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.instances <= MAX_INSTANCES:
            raise ProtocolError(f"A key setup holds 1 to {MAX_INSTANCES} one-time keys, not "
                                f"{self.instances}.")


def check_threshold(threshold: int, roster_size: int) -> None:
    """A threshold must be a strict majority of the roster (and at least 2): below that,
    two disjoint groups of survivors could each unmask, and a coordinator could split
    the nodes to learn more than one sum per instance."""
    if not (threshold >= 2 and roster_size // 2 < threshold <= roster_size):
        raise ProtocolError(f"Threshold {threshold} is not a majority of a roster of "
                            f"{roster_size} nodes (at least {max(2, roster_size // 2 + 1)} "
                            "is needed): refusing it.")


def _valid_advert(advert: object, instances: int) -> bool:
    if not isinstance(advert, dict) or set(advert) != {"c_pk", "s_pks"}:
        return False
    keys = advert["s_pks"]
    return (isinstance(advert["c_pk"], bytes) and len(advert["c_pk"]) == 32
            and isinstance(keys, list) and len(keys) == instances
            and all(isinstance(k, bytes) and len(k) == 32 for k in keys)
            and len(set(keys)) == instances)


class SecAggNode:
    """One node's side. Holds its secrets in memory only."""

    def __init__(self, node_id: int, params: Params) -> None:
        self.id, self.params = node_id, params
        self._c, self.c_pk = masking.new_keypair()
        pairs = [masking.new_keypair() for _ in range(params.instances)]
        self._s = {k: key for k, (key, _) in enumerate(pairs)}  # unused one-time keys
        self.s_pks = [pk for _, pk in pairs]
        self.roster: dict[int, dict] = {}
        self._s_shares: dict[int, list[tuple[int, int]]] = {}  # peer -> shares of its keys
        self._masked: dict[int, dict] = {}  # instance -> what this node masked in it
        self._revealed: dict[int, dict[int, str]] = {}  # instance -> {peer: "b" | "s"}

    def to_state(self) -> dict[str, object]:
        """Everything this node holds, for a host that keeps it between messages (Flower's
        per-node ``Context.state`` in simulation). It contains the node's secret keys."""
        return {"id": self.id, "run_id": self.params.run_id, "threshold": self.params.threshold,
                "instances": self.params.instances, "c": masking.private_bytes(self._c),
                "s": {k: masking.private_bytes(v) for k, v in self._s.items()},
                "s_pks": list(self.s_pks), "roster": self.roster,
                "s_shares": {p: [list(s) for s in v] for p, v in self._s_shares.items()},
                "masked": self._masked, "revealed": self._revealed}

    @classmethod
    def from_state(cls, state: dict, encoding: FixedPoint) -> SecAggNode:
        node = cls.__new__(cls)
        node.id = int(state["id"])
        node.params = Params(run_id=state["run_id"], threshold=int(state["threshold"]),
                             encoding=encoding, instances=int(state["instances"]))
        node._c = masking.load_private(state["c"])
        node.c_pk = masking.public_bytes(node._c)
        node._s = {int(k): masking.load_private(v) for k, v in state["s"].items()}
        node.s_pks = list(state["s_pks"])
        node.roster = {int(k): v for k, v in state["roster"].items()}
        node._s_shares = {int(p): [(int(x), int(y)) for x, y in v]
                          for p, v in state["s_shares"].items()}
        node._masked = {int(k): v for k, v in state["masked"].items()}
        node._revealed = {int(k): {int(p): str(w) for p, w in v.items()}
                          for k, v in state["revealed"].items()}
        return node

    def advertise(self) -> dict[str, object]:
        return {"c_pk": self.c_pk, "s_pks": list(self.s_pks)}

    def _key(self, peer: int) -> bytes:
        return sealing.share_key(self._c, self.roster[peer]["c_pk"], self.params.run_id)

    def share_keys(self, roster: dict[int, dict], threshold: int | None = None, *,
                   max_roster: int | None = None) -> dict[int, bytes]:
        """Check the roster, then send each peer its encrypted shares of our one-time keys.

        ``threshold`` may be fixed only now, once the roster's size is known;
        ``max_roster``: the most nodes this node expects in the job (a larger roster
        holds nodes that should not be there)."""
        if self.roster:
            raise ProtocolError("This node already shared its keys for this run.")
        if threshold is not None:
            self.params = replace(self.params, threshold=int(threshold))
        if max_roster is not None and len(roster) > max_roster:
            raise ProtocolError(f"The roster lists {len(roster)} nodes but this job has at most "
                                f"{max_roster} sites: refusing it.")
        check_threshold(self.params.threshold, len(roster))
        if roster.get(self.id) != self.advertise():
            raise ProtocolError("The roster does not hold this node's own keys.")
        if not all(_valid_advert(a, self.params.instances) for a in roster.values()):
            raise ProtocolError("The roster holds malformed keys.")
        self.roster = dict(roster)
        ids = sorted(roster)
        t, n = self.params.threshold, len(ids)
        per_key = [shamir.share(masking.private_bytes(self._s[k]), t, n)
                   for k in range(self.params.instances)]
        return {peer: sealing.seal(self._key(peer),
                                   sealing.encode_shares([s[i] for s in per_key]),
                                   sealing.aad("s", self.id, peer, -1))
                for i, peer in enumerate(ids)}

    def receive_key_shares(self, incoming: dict[int, bytes]) -> None:
        for sender, blob in incoming.items():
            if sender not in self.roster:
                raise ProtocolError(f"A share came from node {sender}, not on the roster.")
            plain = sealing.open_sealed(self._key(sender), blob,
                                        sealing.aad("s", sender, self.id, -1))
            self._s_shares[sender] = sealing.decode_shares(plain, self.params.instances)

    def masked_input(self, instance: int, active: list[int], update: np.ndarray, *,
                     min_survivors: int = 0, tag: int | None = None) -> dict[str, object]:
        """This instance's masked, encoded update, a commitment to its self mask and
        encrypted shares of it. ``min_survivors``: the fewest survivors with which this
        vector may be unmasked (under distributed DP, the threshold its noise assumed);
        ``tag``: the caller's name for the instance (the round), kept for :meth:`round_of`."""
        active = sorted(set(active))
        if instance not in self._s:
            raise ProtocolError(f"Mask key {instance} of this run is used or does not exist: "
                                "refusing to mask a second vector with it.")
        if self.id not in active or not set(active) <= set(self.roster):
            raise ProtocolError("The round's active set is not part of this run's roster.")
        if not set(active) <= set(self._s_shares):
            raise ProtocolError("This node holds no key shares of some active nodes.")
        need = max(self.params.threshold, min_survivors)
        if len(active) < need:
            raise ProtocolError(f"Only {len(active)} active nodes, fewer than the {need} this "
                                "vector needs: refusing to mask it.")
        enc = self.params.encoding
        encoded = enc.encode(update)  # refuses NaN and infinities
        b = secrets.token_bytes(32)
        b_shares = shamir.share(b, self.params.threshold, len(active))
        sealed = {peer: sealing.seal(self._key(peer), sealing.encode_shares([b_shares[i]]),
                                     sealing.aad("b", self.id, peer, instance))
                  for i, peer in enumerate(active)}
        key = self._s.pop(instance)  # one vector per key: forget it once used
        seeds = {peer: masking.pair_seed(key, self.roster[peer]["s_pks"][instance],
                                         self.params.run_id)
                 for peer in active if peer != self.id}
        y = masking.masked(encoded, b, seeds, self.id, instance, enc.modulus_bits)
        self._masked[instance] = {"active": active, "min_survivors": need, "tag": tag}
        return {"y": y, "b_shares": sealed,
                "b_commit": sealing.commit(self.params.run_id, instance, self.id, b)}

    def round_of(self, instance: int) -> int | None:
        record = self._masked.get(instance)
        return None if record is None else record["tag"]

    def unmask(self, instance: int, survivors: list[int], dropped: list[int],
               b_shares: dict[int, bytes]) -> dict[str, dict[int, tuple[int, int]]]:
        """Shares of ``b`` of every survivor and of ``s_instance`` of every dropped node."""
        record = self._masked.get(instance)
        if record is None:
            raise ProtocolError(f"This node masked nothing in instance {instance}.")
        surv, drop = set(survivors), set(dropped)
        if surv & drop or self.id not in surv:
            raise ProtocolError("A node cannot be both a survivor and dropped.")
        if surv | drop != set(record["active"]):
            raise ProtocolError("The survivors and dropped nodes are not the nodes that "
                                "masked this vector.")
        if len(surv) < record["min_survivors"]:
            raise ProtocolError(f"Only {len(surv)} survivors, fewer than the "
                                f"{record['min_survivors']} this vector needs: refusing to "
                                "unmask.")
        revealed = self._revealed.setdefault(instance, {})
        if any(revealed.get(p) == "b" for p in drop) or any(revealed.get(p) == "s"
                                                            for p in surv):
            raise ProtocolError("This node already revealed the other kind of share of a node "
                                "in this instance: refusing to reveal both.")
        if set(b_shares) != surv:
            raise ProtocolError("The unmasking request lacks shares of some survivors.")
        out_b = {peer: sealing.decode_shares(sealing.open_sealed(
                     self._key(peer), blob, sealing.aad("b", peer, self.id, instance)), 1)[0]
                 for peer, blob in b_shares.items()}
        revealed.update({p: "b" for p in surv})
        revealed.update({p: "s" for p in drop})
        return {"b": out_b, "s": {peer: self._s_shares[peer][instance] for peer in drop}}


class SecAggServer:
    """The coordinator's side: routes ciphertexts and removes masks; sees only the sum."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.roster: dict[int, dict] = {}
        self.dropped: set[int] = set()  # not asked again in this key setup (saves timeouts)
        self.faulty: dict[int, str] = {}  # nodes whose secret could not be rebuilt: out
        self.inconsistent: list[str] = []  # shares off their polynomial (reported)
        self.next_instance = 0

    def make_roster(self, adverts: dict[int, dict]) -> dict[int, dict]:
        good = {n: a for n, a in adverts.items() if _valid_advert(a, self.params.instances)}
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

    @property
    def exhausted(self) -> bool:
        return self.next_instance >= self.params.instances

    def begin(self) -> int:
        """The next unused instance (its one-time keys mask exactly one sum)."""
        if self.exhausted:
            raise RecoveryError("Every one-time mask key of this key setup is used.")
        self.next_instance += 1
        return self.next_instance - 1

    def active(self) -> list[int]:
        return sorted(set(self.roster) - self.dropped - set(self.faulty))

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
            commit = msg.get("b_commit")
            if not isinstance(commit, bytes) or len(commit) != 32:
                reasons[node] = "sent no commitment to its self mask"
                continue
            survivors.append(node)
        dropped = [n for n in active if n not in survivors]
        if len(survivors) < self.params.threshold:
            raise RecoveryError(f"Only {len(survivors)} of {len(active)} nodes sent a usable "
                                f"masked input; the threshold is {self.params.threshold}.")
        return survivors, dropped, reasons

    def unmask(self, instance: int, inputs: dict[int, dict[str, object]], survivors: list[int],
               dropped: list[int], replies: dict[int, dict[str, dict[int, tuple[int, int]]]],
               length: int) -> np.ndarray:
        """The decoded sum of the survivors' updates, once every recovered secret checked
        out and the sum is one that the survivors' clipped vectors can add up to."""
        enc, t = self.params.encoding, self.params.threshold
        if len(replies) < t:
            raise RecoveryError(f"Only {len(replies)} nodes answered the unmasking request; "
                                f"{t} are needed. The round is discarded.")
        total = np.zeros(length, dtype=np.uint64)
        for node in survivors:
            total = enc.add(total, inputs[node]["y"])  # type: ignore[arg-type]
        for node in survivors:
            commit = inputs[node]["b_commit"]
            b = self._recover(node, "b", replies, lambda raw, node=node, commit=commit:
                              sealing.commit(self.params.run_id, instance, node, raw) == commit)
            total = enc.sub(total, masking.prg(b, instance, length, enc.modulus_bits))
        for node in dropped:
            public = self.roster[node]["s_pks"][instance]
            raw = self._recover(node, "s", replies, lambda raw, public=public:
                                len(raw) == 32 and masking.public_bytes(
                                    masking.load_private(raw)) == public)
            key = masking.load_private(raw)
            for peer in survivors:
                seed = masking.pair_seed(key, self.roster[peer]["s_pks"][instance],
                                         self.params.run_id)
                stream = masking.prg(seed, instance, length, enc.modulus_bits)
                # peer added +PRG for a higher id, -PRG for a lower one: undo it
                total = enc.sub(total, stream) if node > peer else enc.add(total, stream)
        self.dropped |= set(dropped)
        result = enc.decode(total)
        if not np.all(np.abs(result) <= enc.clip * len(survivors)):
            raise RecoveryError(f"The unmasked sum lies outside what {len(survivors)} clipped "
                                "vectors can add up to: a node sent a corrupted vector. The "
                                "round is discarded.")
        return result

    def _recover(self, node: int, kind: str,
                 replies: dict[int, dict[str, dict[int, tuple[int, int]]]],
                 authentic: object) -> bytes:
        """``node``'s secret of ``kind`` from ``t`` shares that reconstruct a secret which
        passes ``authentic``; the senders of shares off that polynomial are faulty."""
        held: list[tuple[int, tuple[int, int]]] = []
        for sender, reply in replies.items():
            share = (reply.get(kind) or {}).get(node) if isinstance(reply, dict) else None
            if (isinstance(share, list | tuple) and len(share) == 2
                    and all(isinstance(v, int) and 0 <= v < shamir.PRIME for v in share)):
                held.append((sender, (int(share[0]), int(share[1]))))
        t = self.params.threshold
        if len(held) < t:
            raise RecoveryError(f"Too few shares to remove node {node}'s mask; the round is "
                                "discarded.")
        for combo in itertools.islice(itertools.combinations(held, t), _MAX_TRIES):
            try:
                secret = shamir.recover([share for _, share in combo])
            except ConfigError:
                continue
            if authentic(secret):  # type: ignore[operator]
                good = [share for _, share in combo]
                # Off the polynomial: the holder altered it, or the dealer dealt it wrong;
                # without verifiable sharing the two look alike, so it is reported, no
                # one is excluded, and the correct subset is used.
                self.inconsistent.extend(
                    f"node {sender}'s share of node {node}'s {_KIND[kind]} is wrong"
                    for sender, (x, y) in held if shamir.interpolate(good, x) != y)
                return secret
        self.faulty.setdefault(node, f"its {_KIND[kind]} could not be rebuilt from its "
                                     "shares (it committed to another secret, or too many "
                                     "shares were corrupted)")
        raise RecoveryError(f"The shares of node {node}'s {_KIND[kind]} do not rebuild the "
                            "secret it committed to; the round is discarded.")
