"""Secure aggregation: fixed-point encoding (``encoding``),
pairwise and self masks from X25519 + HKDF + ChaCha20 (``masking``), authenticated
Shamir t-of-n sharing (``shamir``), shares sealed to one peer and commitments
and every share (``sealing``), and the transport-free protocol with one-time mask keys,
dropout recovery and checked secrets (``protocol``, the front door: ``Params`` in
``params``, ``SecAggNode`` in ``node``, ``SecAggServer`` in ``server``).

Hand-written on pyca ``cryptography`` primitives rather than Flower's SecAgg+, which
derives every mask from a 32-bit seed through numpy's RandomState (brute-forceable).
``federation.node.handler`` (nodes) and ``federation.coordinator.secure`` (coordinator) run it
over the federation's Transport.
"""
