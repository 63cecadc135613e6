"""privmed: privacy-preserving machine learning on medical images.

The front door for library use::

    from privmed import load_data, create_model, fit, TrainConfig, PrivacyConfig
    bundle = load_data("synthetic")
    model = create_model("scatter-linear", in_channels=1, num_classes=2, image_size=(28, 28))
    result = fit(model, bundle.train, bundle.val, TrainConfig(epochs=30),
                 PrivacyConfig(target_epsilon=3.0))
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
