"""Models by name, plus saving/loading trained models and users' own networks."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from opacus.validators import ModuleValidator
from torch import nn

from privmed.errors import ConfigError, DataError
from privmed.fileio import save_private_torch
from privmed.models.he import HECNN
from privmed.models.layers import Standardize
from privmed.models.networks import ResNetGN, SmallCNN
from privmed.models.scatter import ScatterNet

MODEL_FORMAT = "privmed.model/1"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    needs_image_size: bool = False


_REGISTRY: dict[str, ModelSpec] = {}
# Best on PneumoniaMNIST with and without DP (docs/benchmarks.md).
RECOMMENDED_MODEL = "scatter-linear"


def register_model(name: str, builder: Callable[..., nn.Module], description: str, *,
                   needs_image_size: bool = False, **defaults: Any) -> None:
    """Add a network; ``builder(in_channels=, num_classes=, [image_size=,] **defaults)``
    makes it."""
    _REGISTRY[name] = ModelSpec(name, builder, description, dict(defaults), needs_image_size)


register_model("small-cnn", SmallCNN, "3-stage CNN, GroupNorm + tanh (fast)")
register_model("resnet-gn", ResNetGN,
               "ResNet with GroupNorm and weight standardisation (De et al. 2022)")
register_model("scatter-linear", ScatterNet,
               "fixed wavelet scattering + linear head (Tramer & Boneh 2021; best at low epsilon)",
               needs_image_size=True, head="linear")
register_model("scatter-cnn", ScatterNet, "fixed wavelet scattering + small CNN head",
               needs_image_size=True, head="cnn")
register_model("he-cnn", HECNN,
               "conv -> x^2 -> linear -> x^2 -> linear; servable on encrypted images "
               "(privmed encrypted compile)", needs_image_size=True)


def list_models() -> list[ModelSpec]:
    return list(_REGISTRY.values())


def model_kwargs(name: str, image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """The keyword arguments a registered model needs for images of ``image_shape``."""
    spec = _REGISTRY.get(name)
    return {"image_size": list(image_shape[1:])} if spec and spec.needs_image_size else {}


def create_model(name: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a registered network for images with ``in_channels`` and ``num_classes``.

    Models that need the image size (``model_kwargs``) take ``image_size=(H, W)``.
    ``input_mean`` / ``input_std`` (one value per channel) replace the fixed input
    standardisation of every registered model (federated normalisation statistics).
    """
    mean, std = kwargs.pop("input_mean", None), kwargs.pop("input_std", None)
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ConfigError(f"Unknown model '{name}'; choose one of: {', '.join(_REGISTRY)}.")
    if spec.needs_image_size and "image_size" not in kwargs:
        raise ConfigError(f"Model '{name}' needs image_size=(H, W).")
    try:
        model = spec.builder(in_channels=in_channels, num_classes=num_classes,
                             **{**spec.defaults, **kwargs})
    except ValueError as exc:
        raise ConfigError(f"Model '{name}' cannot be built: {exc}.") from None
    if mean is not None or std is not None:
        _set_input_statistics(model, name, in_channels, mean, std)
    assert_dp_compatible(model, name)
    return model


def model_for(data: Any, name: str = RECOMMENDED_MODEL, **kwargs: Any) -> nn.Module:
    """A registered network sized for ``data`` (an ImageDataset, or a DataBundle whose
    train split is used): its channels, classes and, where the model needs it, image
    size come from the data, so ``model_for(bundle, "scatter-linear")`` replaces
    ``create_model(name, C, K, **model_kwargs(name, shape))``. ``kwargs`` override."""
    dataset = getattr(data, "train", data)  # a DataBundle trains on its train split
    shape = getattr(dataset, "image_shape", None)
    if shape is None or not hasattr(dataset, "num_classes"):
        raise ConfigError(f"model_for needs an ImageDataset or a DataBundle, got "
                          f"{type(data).__name__}.")
    return create_model(name, shape[0], dataset.num_classes,
                        **{**model_kwargs(name, shape), **kwargs})


def _set_input_statistics(model: nn.Module, name: str, channels: int, mean: Any,
                          std: Any) -> None:
    mean = [float(v) for v in (mean if isinstance(mean, list | tuple) else [mean])]
    std = [float(v) for v in (std if isinstance(std, list | tuple) else [std])]
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ConfigError(f"Input statistics need one mean and one positive std per channel "
                          f"({channels}), got mean {mean} and std {std}.")
    layers = [m for m in model.modules() if isinstance(m, Standardize)]
    if not layers:
        raise ConfigError(f"Model '{name}' has no input standardisation to set.")
    for layer in layers:
        layer.set_statistics(mean, std)


def assert_dp_compatible(model: nn.Module, name: str = "model") -> None:
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(f"Model '{name}' cannot be trained with DP-SGD: {errors[0]}.")


def make_dp_compatible(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Replace layers Opacus cannot train privately (BatchNorm -> GroupNorm, ...).

    Returns the fixed model and one note per kind of change, for the user.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return model, []
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    fixed = ModuleValidator.fix(model)
    remaining = ModuleValidator.validate(fixed, strict=False)
    if remaining:
        raise ConfigError(f"Model cannot be made DP-compatible: {remaining[0]}.")
    notes = []
    if n_bn:
        notes.append(f"Replaced {n_bn} BatchNorm layer(s) with GroupNorm so that DP-SGD "
                     "can compute per-sample gradients (Opacus ModuleValidator.fix).")
    else:
        notes.append(f"Adapted the model for DP-SGD (Opacus ModuleValidator.fix): {errors[0]}.")
    return fixed, notes


def load_user_model(path: str | Path) -> tuple[nn.Module, list[str]]:
    """Load a user's whole ``torch.save``-d nn.Module and make it DP-compatible."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise DataError(f"Model file {path} does not exist.") from None
    except (AttributeError, ImportError) as exc:  # the pickle names a class we cannot import
        raise DataError(unimportable_class(path, exc)) from None
    except Exception as exc:  # torch raises many types for a bad pickle
        raise DataError(f"Model file {path} could not be read ({type(exc).__name__}).") from None
    if not isinstance(obj, nn.Module):
        raise DataError(f"Model file {path} holds a {type(obj).__name__}, not a torch nn.Module "
                        "(save the model with torch.save(model, path)).")
    return make_dp_compatible(obj)


def unimportable_class(path: Path, exc: BaseException) -> str:
    """One sentence for a pickled nn.Module whose class this process cannot import."""
    found = re.search(r"attribute '([^']+)' on <module '([^']+)'", str(exc))
    cls, module = found.groups() if found else (None, getattr(exc, "name", None))
    what = f"class {cls}" if cls else "class"
    if module == "__main__":
        where = ("was defined in the script that saved it (__main__), which privmed cannot "
                 "import")
    elif module:
        where = f"comes from module '{module}', which privmed cannot import"
    else:
        where = "cannot be imported here"
    return (f"Model file {path} holds a network whose {what} {where}: define the class in a "
            "module file (e.g. my_nets.py), import it from there when you create and "
            "torch.save() the model, and run privmed where that module is importable (its "
            "folder as the working directory, or on PYTHONPATH).")


def save_model(path: str | Path, model: nn.Module, *, name: str | None,
               kwargs: dict[str, Any], class_names: tuple[str, ...],
               image_shape: tuple[int, int, int], meta: dict[str, Any] | None = None) -> Path:
    """Write a trained model: registry name + state dict, or the whole module
    when it is a user's own network. Written atomically, mode 0600 (weights can
    reveal training images)."""
    path = Path(path)
    payload: dict[str, Any] = {
        "format": MODEL_FORMAT, "name": name, "kwargs": kwargs,
        "class_names": list(class_names), "image_shape": list(image_shape),
        "meta": meta or {},
    }
    if name is not None and name in _REGISTRY:
        payload["state_dict"] = model.state_dict()
    else:
        payload["module"] = model
    return save_private_torch(payload, path)


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model written by :func:`save_model`; returns (model, payload without weights)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise DataError(f"Model file {path} does not exist.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ImportError) as exc:  # a user's own network, defined elsewhere
        raise DataError(unimportable_class(path, exc)) from None
    except Exception as exc:
        raise DataError(f"Model file {path} could not be read ({type(exc).__name__}).") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise DataError(f"{path} is not a privmed model file (expected format {MODEL_FORMAT}).")
    c = payload["image_shape"][0]
    if "module" in payload:
        model = payload["module"]
    else:
        model = create_model(payload["name"], c, len(payload["class_names"]), **payload["kwargs"])
        model.load_state_dict(payload["state_dict"])
    model.eval()
    info = {k: v for k, v in payload.items() if k not in ("state_dict", "module")}
    return model, info


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
