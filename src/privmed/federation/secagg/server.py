"""The coordinator's side of secure aggregation: rosters, instances, survivors, and
unmasking with every share and secret checked against its commitment."""

from __future__ import annotations

import numpy as np

from privmed.errors import ConfigError
from privmed.federation.secagg import masking, sealing, shamir
from privmed.federation.secagg.params import (
    Params,
    RecoveryError,
    valid_advert,
    valid_commits,
)

_KIND = {"b": "self mask", "s": "mask key"}


class SecAggServer:
    """The coordinator's side: routes ciphertexts and removes masks; sees only the sum."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.roster: dict[int, dict] = {}
        self.s_commits: dict[int, list[list[bytes]]] = {}  # dealer -> key -> share commits
        self.dropped: set[int] = set()  # not asked again in this key setup (saves timeouts)
        self.faulty: dict[int, str] = {}  # nodes proven faulty: excluded
        self.inconsistent: list[str] = []  # shares left out (reported)
        self.next_instance = 0

    def make_roster(self, adverts: dict[int, dict]) -> dict[int, dict]:
        good = {n: a for n, a in adverts.items() if valid_advert(a, self.params.instances)}
        if len(good) < self.params.threshold:
            raise RecoveryError(f"Only {len(good)} nodes completed key setup; the threshold is "
                                f"{self.params.threshold}.")
        self.roster = good
        return good

    def accept_key_shares(self, dealt: dict[int, tuple[dict, list]],
                          reports: dict[int, list[int]]) -> dict[int, dict]:
        """The final roster: dealers whose commitments are well formed and whose shares at
        least ``t`` of the nodes that answered (``reports``: holder -> dealers whose
        ciphertext did not open there) hold; every one of them answered too."""
        n, k = len(self.roster), self.params.instances
        for dealer, (_, commits) in dealt.items():
            if isinstance(commits, list) and len(commits) == k and all(
                    valid_commits(c, n) for c in commits):
                self.s_commits[dealer] = commits
        final = {}
        for dealer in self.s_commits:
            holders = [h for h, bad in reports.items() if dealer not in bad]
            if dealer in reports and len(holders) >= self.params.threshold:
                final[dealer] = self.roster[dealer]
        self.roster = final
        if len(final) < self.params.threshold:
            raise RecoveryError(f"Only {len(final)} nodes finished key setup; "
                                f"{self.params.threshold} are needed.")
        return final

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
            if not isinstance(msg, dict):
                reasons[node] = "sent no masked input"
                continue
            y = msg.get("y")
            if not isinstance(y, np.ndarray) or y.dtype != np.uint64 or y.shape != (length,):
                reasons[node] = "sent a malformed or wrong-length masked vector"
                continue
            shares = msg.get("b_shares")
            if (not isinstance(shares, dict) or set(shares) != set(active)
                    or not all(isinstance(v, bytes) for v in shares.values())):
                reasons[node] = "sent shares for the wrong set of nodes"
                continue
            commit = msg.get("b_commit")
            if (not isinstance(commit, bytes) or len(commit) != 32
                    or not valid_commits(msg.get("share_commits"), len(active))):
                reasons[node] = "sent no commitments to its self mask and its shares"
                continue
            survivors.append(node)
        dropped = [n for n in active if n not in survivors]
        if len(survivors) < self.params.threshold:
            raise RecoveryError(f"Only {len(survivors)} of {len(active)} nodes sent a usable "
                                f"masked input; the threshold is {self.params.threshold}.")
        return survivors, dropped, reasons

    def sum_without_unmasking(self, active: list[int], inputs: dict[int, dict[str, object]],
                              length: int) -> np.ndarray:
        """The decoded sum of an optimistic instance (no self masks): every active node's
        pairwise masks cancel once all of them are summed. One vector missing or malformed
        and the sum is lost (RecoveryError): the nodes never reveal shares of such an
        instance. Its absent senders count as dropped for this key setup."""
        enc = self.params.encoding
        missing = []
        total = np.zeros(length, dtype=np.uint64)
        for node in active:
            y = (inputs.get(node) or {}).get("y") if isinstance(inputs.get(node), dict) else None
            if not isinstance(y, np.ndarray) or y.dtype != np.uint64 or y.shape != (length,):
                missing.append(node)
                continue
            total = enc.add(total, y)
        if missing:
            self.dropped |= set(missing)
            raise RecoveryError(f"{len(missing)} of {len(active)} nodes sent no usable vector "
                                "in a round masked without self masks, which cannot be "
                                "unmasked without them; the round is discarded.")
        return self._decoded(total, len(active))

    def unmask(self, instance: int, inputs: dict[int, dict[str, object]], survivors: list[int],
               dropped: list[int], replies: dict[int, object], length: int) -> np.ndarray:
        """The decoded sum of the survivors' updates, once every share checked out against
        its commitment, every rebuilt secret against its own, and the sum is one that the
        survivors' clipped vectors can add up to."""
        enc, t = self.params.encoding, self.params.threshold
        replies = {n: r for n, r in replies.items() if isinstance(r, dict)}
        if len(replies) < t:
            raise RecoveryError(f"Only {len(replies)} nodes answered the unmasking request; "
                                f"{t} are needed. The round is discarded.")
        self._judge_unopened(replies, survivors)
        total = np.zeros(length, dtype=np.uint64)
        for node in survivors:
            total = enc.add(total, inputs[node]["y"])  # type: ignore[arg-type]
        for node in survivors:
            commit = inputs[node]["b_commit"]
            b = self._recover(node, "b", instance, replies, inputs[node]["share_commits"],
                              lambda raw, node=node, commit=commit: sealing.commit(
                                  self.params.run_id, instance, node, raw) == commit)
            total = enc.sub(total, masking.prg(b, instance, length, enc.modulus_bits))
        for node in dropped:
            public = self.roster[node]["s_pks"][instance]
            raw = self._recover(node, "s", instance, replies,
                                self.s_commits[node][instance],
                                lambda raw, public=public: len(raw) == 32
                                and masking.public_bytes(masking.load_private(raw)) == public)
            key = masking.load_private(raw)
            for peer in survivors:
                seed = masking.pair_seed(key, self.roster[peer]["s_pks"][instance],
                                         self.params.run_id)
                stream = masking.prg(seed, instance, length, enc.modulus_bits)
                # peer added +PRG for a higher id, -PRG for a lower one: undo it
                total = enc.sub(total, stream) if node > peer else enc.add(total, stream)
        self.dropped |= set(dropped)
        return self._decoded(total, len(survivors))

    def _decoded(self, total: np.ndarray, count: int) -> np.ndarray:
        """The decoded sum, refused unless ``count`` clipped vectors can add up to it."""
        enc = self.params.encoding
        result = enc.decode(total)
        if not np.all(np.abs(result) <= enc.clip * count):
            raise RecoveryError(f"The unmasked sum lies outside what {count} clipped vectors "
                                "can add up to: a node sent a corrupted vector. The round is "
                                "discarded.")
        return result

    def _judge_unopened(self, replies: dict[int, dict], survivors: list[int]) -> None:
        """A survivor whose sealed shares ``t`` or more nodes could not open dealt them
        wrong: with at most ``t - 1`` dishonest nodes, an honest one says so."""
        for node in survivors:
            told = [h for h, r in replies.items()
                    if isinstance(r.get("bad"), list) and node in r["bad"]]
            if len(told) >= self.params.threshold:
                self.faulty.setdefault(node, "its sealed self-mask shares did not open at "
                                             f"{len(told)} nodes")

    def _recover(self, node: int, kind: str, instance: int, replies: dict[int, dict],
                 commits: list[bytes], authentic: object) -> bytes:
        """``node``'s secret of ``kind`` from ``t`` shares that match ``node``'s published
        commitments; a share that does not is left out and reported."""
        good: list[tuple[int, int]] = []
        for sender, reply in replies.items():
            share = (reply.get(kind) if isinstance(reply.get(kind), dict) else {}).get(node)
            if share is None:
                continue
            if (isinstance(share, list | tuple) and len(share) == 3
                    and isinstance(share[0], int) and 1 <= share[0] <= len(commits)
                    and isinstance(share[1], int) and 0 <= share[1] < shamir.PRIME
                    and isinstance(share[2], bytes) and len(share[2]) == 16
                    and sealing.share_commitment(self.params.run_id, kind, instance, node,
                                                 (share[0], share[1], share[2]))
                    == commits[share[0] - 1]):
                good.append((share[0], share[1]))
            else:
                self.inconsistent.append(f"node {sender}'s share of node {node}'s "
                                         f"{_KIND[kind]} does not match its commitment")
        good = list(dict(good).items())  # one share per x
        t = self.params.threshold
        if len(good) < t:
            raise RecoveryError(f"Too few good shares to remove node {node}'s mask; the round "
                                "is discarded.")
        try:
            secret = shamir.recover(good[:t])
        except ConfigError:
            secret = None
        if secret is None or not authentic(secret):  # type: ignore[operator]
            # Shares that match the dealer's own commitments rebuild no secret it committed
            # to: the dealer dealt them wrong.
            self.faulty.setdefault(node, f"its committed shares do not rebuild its "
                                         f"{_KIND[kind]}")
            raise RecoveryError(f"The shares of node {node}'s {_KIND[kind]} do not rebuild the "
                                "secret it committed to; the round is discarded.")
        return secret
