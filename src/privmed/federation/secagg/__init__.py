"""Secure aggregation building blocks (issue 4, in progress): fixed-point encoding,
pairwise and self masks from X25519 + HKDF + ChaCha20, Shamir t-of-n sharing.

Hand-written on pyca ``cryptography`` primitives rather than Flower's SecAgg+, which
derives every mask from a 32-bit seed through numpy's RandomState (brute-forceable).
Not yet wired into the federation.
"""
