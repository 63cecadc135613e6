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
``b``, encrypted shares of ``b`` and a commitment to each share, then forgets ``s_k``'s
private half. The coordinator asks the survivors for the shares of ``b`` of every
survivor and of ``s_k`` of every node that dropped, checks each share against its
dealer's commitment (a wrong one is left out), rebuilds each secret from ``t`` good
shares and checks it (``b`` against its commitment, ``s_k`` against its public key: a
dealer whose good shares do not rebuild its own secret is excluded), removes the masks,
checks the sum lies within what the survivors' clipped vectors can add up to, and
learns only the sum.

Why one-time keys: with a pairwise key kept for a whole run, a node that survived one
round (its ``b`` rebuilt) and dropped in a later one (its ``s`` rebuilt) had every
earlier masked vector opened. Now each key masks exactly one vector, and for that
vector every node reveals either ``b`` shares or ``s`` shares of a peer, never both; no
sequence of dropouts, retries or resumes combines secrets of two instances. A node may
come back after it dropped: its later instances use keys never revealed.
"""

from privmed.federation.secagg.node import SecAggNode
from privmed.federation.secagg.params import (
    MAX_INSTANCES,
    Params,
    ProtocolError,
    RecoveryError,
    check_threshold,
)
from privmed.federation.secagg.server import SecAggServer

__all__ = ["MAX_INSTANCES", "Params", "ProtocolError", "RecoveryError", "SecAggNode",
           "SecAggServer", "check_threshold"]
