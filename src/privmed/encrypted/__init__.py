"""Encrypted inference (CKKS): the model owner serves a model that computes on the
clinic's encrypted images and never sees a key, an image or a score.

Front doors: :func:`compile_encrypted` (a trained model -> a checked ``.he`` artefact),
:func:`serve_encrypted` (serve it over HTTP, in the foreground or a background
process) and :func:`infer_encrypted` (encrypt images here, classify them there, decrypt
here). Exports are lazy: the CLI imports this package without TenSEAL or FastAPI.
"""

_LAZY = {
    "compile_encrypted": "privmed.encrypted.artefact",
    "serve_encrypted": "privmed.encrypted.server",
    "infer_encrypted": "privmed.encrypted.client",
    "EncryptedServer": "privmed.encrypted.server",
    "ServerLimits": "privmed.encrypted.server",
    "EncryptedClient": "privmed.encrypted.client",
    "Prediction": "privmed.encrypted.client",
    "HEModel": "privmed.encrypted.compiler",
    "compile_model": "privmed.encrypted.compiler",
}


def __getattr__(name: str):  # lazy: `privmed --help` must not import torch or TenSEAL
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'privmed.encrypted' has no attribute {name!r}")


__all__ = list(_LAZY)
