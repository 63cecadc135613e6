"""A node's side of secure aggregation: its keys, its shares of its peers' keys, its
masked vectors, and the rule that it reveals one kind of share per peer and instance."""

from __future__ import annotations

import secrets
from dataclasses import replace

import numpy as np

from privmed.federation.secagg import masking, sealing, shamir
from privmed.federation.secagg.encoding import FixedPoint
from privmed.federation.secagg.params import (
    Params,
    ProtocolError,
    check_threshold,
    valid_advert,
)


class SecAggNode:
    """One node's side. Holds its secrets in memory only."""

    def __init__(self, node_id: int, params: Params) -> None:
        self.id, self.params = node_id, params
        self._c, self.c_pk = masking.new_keypair()
        pairs = [masking.new_keypair() for _ in range(params.instances)]
        self._s = {k: key for k, (key, _) in enumerate(pairs)}  # unused one-time keys
        self.s_pks = [pk for _, pk in pairs]
        self.roster: dict[int, dict] = {}
        self._s_shares: dict[int, list[sealing.Share]] = {}  # peer -> shares of its keys
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
        node._s_shares = {int(p): [(int(x), int(y), bytes(r)) for x, y, r in v]
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
                   max_roster: int | None = None
                   ) -> tuple[dict[int, bytes], list[list[bytes]]]:
        """Check the roster, then seal each peer its shares of our one-time keys.

        Returns ``(blobs, commits)``: a ciphertext per peer, and for every key a
        commitment to each peer's share (in roster order) for the coordinator.
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
        if not all(valid_advert(a, self.params.instances) for a in roster.values()):
            raise ProtocolError("The roster holds malformed keys.")
        self.roster = dict(roster)
        ids = sorted(roster)
        t, n = self.params.threshold, len(ids)
        per_key = [sealing.with_blinding(shamir.share(masking.private_bytes(self._s[k]), t, n))
                   for k in range(self.params.instances)]
        commits = [[sealing.share_commitment(self.params.run_id, "s", k, self.id, share)
                    for share in shares] for k, shares in enumerate(per_key)]
        blobs = {peer: sealing.seal(self._key(peer),
                                    sealing.encode_shares([s[i] for s in per_key]),
                                    sealing.aad("s", self.id, peer, -1))
                 for i, peer in enumerate(ids)}
        return blobs, commits

    def receive_key_shares(self, incoming: dict[int, bytes]) -> list[int]:
        """Keep the peers' shares; returns the peers whose ciphertext did not open (their
        shares are not held here, and the coordinator hears of it)."""
        bad = []
        for sender, blob in incoming.items():
            if sender not in self.roster:
                raise ProtocolError(f"A share came from node {sender}, not on the roster.")
            try:
                plain = sealing.open_sealed(self._key(sender), blob,
                                            sealing.aad("s", sender, self.id, -1))
                self._s_shares[sender] = sealing.decode_shares(plain, self.params.instances)
            except ProtocolError:
                bad.append(sender)
        return sorted(bad)

    def masked_input(self, instance: int, active: list[int], update: np.ndarray, *,
                     min_survivors: int = 0, tag: object = None,
                     self_mask: bool = True) -> dict[str, object]:
        """This instance's masked, encoded update, a commitment to its self mask, and
        sealed shares of it with a commitment to each. ``min_survivors``: the fewest
        survivors with which this vector may be unmasked (under distributed DP, the
        threshold its noise assumed); ``tag``: the caller's note on the instance (which
        round, which stored vector), kept for :meth:`tag_of`.

        ``self_mask=False`` (an *optimistic* instance): pairwise masks only, so the sum of
        every active node's vector needs no unmasking step; this node then never reveals
        a share for the instance (:meth:`unmask` refuses it), so if any active node's
        vector is missing, no one's can be unmasked and the instance is lost."""
        active = sorted(set(active))
        if not isinstance(instance, int) or instance not in self._s:
            raise ProtocolError(f"Mask key {instance} of this run is used or does not exist: "
                                "refusing to mask a second vector with it.")
        if self.id not in active or not set(active) <= set(self.roster):
            raise ProtocolError("The round's active set is not part of this run's roster.")
        need = max(self.params.threshold, min_survivors)
        if len(active) < need:
            raise ProtocolError(f"Only {len(active)} active nodes, fewer than the {need} this "
                                "vector needs: refusing to mask it.")
        enc = self.params.encoding
        encoded = enc.encode(update)  # refuses NaN and infinities
        if not self_mask:
            key = self._s.pop(instance)
            seeds = {peer: masking.pair_seed(key, self.roster[peer]["s_pks"][instance],
                                             self.params.run_id)
                     for peer in active if peer != self.id}
            self._masked[instance] = {"active": active, "min_survivors": need, "tag": tag,
                                      "self_mask": False}
            return {"y": masking.masked(encoded, None, seeds, self.id, instance,
                                        enc.modulus_bits)}
        b = secrets.token_bytes(32)
        b_shares = sealing.with_blinding(shamir.share(b, self.params.threshold, len(active)))
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
                "b_commit": sealing.commit(self.params.run_id, instance, self.id, b),
                "share_commits": [sealing.share_commitment(self.params.run_id, "b", instance,
                                                           self.id, share)
                                  for share in b_shares]}

    def tag_of(self, instance: int) -> object:
        record = self._masked.get(instance)
        return None if record is None else record["tag"]

    def unmask(self, instance: int, survivors: list[int], dropped: list[int],
               b_shares: dict[int, bytes]) -> dict[str, object]:
        """Shares of ``b`` of every survivor and of ``s_instance`` of every dropped node,
        and ``bad``: the survivors whose sealed share did not open here."""
        record = self._masked.get(instance)
        if record is None:
            raise ProtocolError(f"This node masked nothing in instance {instance}.")
        if record.get("self_mask") is False:
            raise ProtocolError(f"Instance {instance} was masked without self masks: its "
                                "shares are never revealed, so it cannot be unmasked.")
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
        if not isinstance(b_shares, dict) or set(b_shares) != surv:
            raise ProtocolError("The unmasking request lacks shares of some survivors.")
        out_b, bad = {}, []
        for peer, blob in b_shares.items():
            try:
                out_b[peer] = sealing.decode_shares(sealing.open_sealed(
                    self._key(peer), blob, sealing.aad("b", peer, self.id, instance)), 1)[0]
            except ProtocolError:
                bad.append(peer)
        revealed.update({p: "b" for p in surv})
        revealed.update({p: "s" for p in drop})
        return {"b": out_b, "bad": sorted(bad),
                "s": {p: self._s_shares[p][instance] for p in drop if p in self._s_shares}}
