"""Privacy audits: membership inference and gradient inversion against privmed models.

Front doors: :func:`audit_membership` (attack a run, measured ε next to claimed ε) and
:func:`audit_inversion` (rebuild a node's images from its update), both in ``runs.py``.
"""

_LAZY = {"audit_membership": "privmed.audit.runs", "audit_inversion": "privmed.audit.runs",
         "save_audit": "privmed.audit.runs"}


def __getattr__(name: str):  # lazy: the CLI imports this package without torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'privmed.audit' has no attribute {name!r}")


__all__ = list(_LAZY)
