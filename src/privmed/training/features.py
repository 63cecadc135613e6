"""Features of a fixed, data-independent front end (e.g. scattering), computed once.

A model with ``fixed_features`` trains only its head: training, evaluation, a federated
node's rounds and the membership audit pass the dataset through the front end once per
content, not once per step or round.
"""

from __future__ import annotations

import torch
from torch import nn

from privmed.data import ImageDataset
from privmed.errors import ConfigError

_FEATURE_CACHE: dict[tuple[str, str], ImageDataset] = {}


def fixed_feature_dataset(fixed: nn.Module, dataset: ImageDataset,
                          batch_size: int = 512) -> ImageDataset:
    """``dataset`` passed through a fixed (parameter-free) module, cached per content."""
    if any(p.requires_grad for p in fixed.parameters()):
        raise ConfigError("A model's fixed_features must have no trainable parameters.")
    key = (repr(fixed), dataset.dataset_id)
    if key not in _FEATURE_CACHE:
        fixed.eval()
        feats = torch.cat([fixed(dataset.images[i:i + batch_size])
                           for i in range(0, len(dataset), batch_size)])
        if len(_FEATURE_CACHE) >= 8:
            _FEATURE_CACHE.pop(next(iter(_FEATURE_CACHE)))
        _FEATURE_CACHE[key] = ImageDataset(feats, dataset.labels, dataset.class_names,
                                           f"{dataset.name} (features)")
    return _FEATURE_CACHE[key]
