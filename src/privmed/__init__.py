"""privmed: privacy-preserving machine learning on medical images.

One front door per capability (README "Python API"; each is what its command calls)::

    import privmed
    results = privmed.train("synthetic", "runs/x", epsilon=3, ledger="ledger.sqlite")
    fed = privmed.simulate(privmed.load_data("synthetic"), "runs/fed", num_sites=3)
    report = privmed.compile_encrypted("runs/he", data="synthetic")

and ``serve_encrypted``, ``infer_encrypted``, ``audit_membership``, ``audit_inversion``,
``deidentify_dicom``, ``anonymize_table``, ``dp_table_stats``. For your own loop::

    bundle = privmed.load_data("synthetic")
    model = privmed.model_for(bundle, "scatter-linear")
    result = privmed.fit(model, bundle.train, bundle.val, privmed.TrainConfig(epochs=30),
                         privmed.PrivacyConfig(target_epsilon=3.0))
    print(result.epsilon, result.metrics["val"]["roc_auc"])
"""

__version__ = "0.1.0"

_LAZY = {
    "load_data": "privmed.data",
    "ImageDataset": "privmed.data",
    "DataBundle": "privmed.data",
    "create_model": "privmed.models",
    "model_for": "privmed.models",
    "fit": "privmed.training",
    "train": "privmed.training.train",
    "train_run": "privmed.training.run",
    "FitResult": "privmed.training",
    "TrainConfig": "privmed.training",
    "evaluate": "privmed.training",
    "PrivacyConfig": "privmed.privacy",
    "BudgetLedger": "privmed.privacy",
    "simulate": "privmed.simulation",
    "compile_encrypted": "privmed.encrypted.artefact",
    "serve_encrypted": "privmed.encrypted.server",
    "infer_encrypted": "privmed.encrypted.client",
    "audit_membership": "privmed.audit.runs",
    "audit_inversion": "privmed.audit.runs",
    "deidentify_dicom": "privmed.deid.dicom",
    "anonymize_table": "privmed.tabular.release",
    "dp_table_stats": "privmed.tabular.release",
}


def __getattr__(name: str):  # lazy so `privmed --help` does not import torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'privmed' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
