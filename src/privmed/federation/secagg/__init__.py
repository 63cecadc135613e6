"""Secure aggregation: fixed-point encoding (``encoding``),
pairwise and self masks from X25519 + HKDF + ChaCha20 (``masking``), Shamir t-of-n
sharing (``shamir``) and the transport-free protocol with dropout recovery
(``protocol``: ``SecAggNode``, ``SecAggServer``).

Hand-written on pyca ``cryptography`` primitives rather than Flower's SecAgg+, which
derives every mask from a 32-bit seed through numpy's RandomState (brute-forceable).
``privmed.federation.secure`` runs it over the federation's Transport.
"""
