"""``privmed.compile_encrypted``: a trained model file in, a checked servable artefact out.

What ``privmed encrypted compile`` does after parsing: load the model, take the
calibration images (synthetic by default: no patient's trace in the public card),
compile, run a few images encrypted against plaintext, and write the ``.he`` file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from privmed.data import DataBundle, load_data
from privmed.encrypted.calibration import calibration_images as take
from privmed.encrypted.calibration import calibration_set, synthetic_images
from privmed.encrypted.compiler import compile_model
from privmed.errors import ConfigError
from privmed.models import load_model


def default_artefact_path(model: Path) -> Path:
    """``RUN/model.he`` for a run folder, else the model file with suffix ``.he``."""
    return model / "model.he" if model.is_dir() else model.with_suffix(".he")


def compile_encrypted(model: str | Path, data: str | Path | DataBundle | None = None,
                      out: str | Path | None = None, *, calibration: str = "synthetic",
                      calibration_images: int = 2000, check: int = 4) -> dict[str, Any]:
    """Compile a trained ``model.pt`` (or its run folder) for CKKS encrypted inference.

    ``calibration``: the images that set the value ranges and the published output scale:
    ``"synthetic"`` (default, no patient data), ``"public:DATA"`` or ``"private"`` (the
    training images of ``data``; the public card then says so). ``check`` test images of
    ``data`` (synthetic images without ``data``) run encrypted; any decision that differs
    from plaintext is a ConfigError and nothing is written. The artefact goes to ``out``
    (default: ``model.he`` beside the model). Returns the compile report: ``path``,
    ``ranges``, ``ckks``, ``output_scale``, ``calibration`` and ``check``
    (``same_decisions``, ``max_abs_error``; None when ``check=0``). ::

        report = privmed.compile_encrypted("runs/he", data="synthetic")
    """
    from privmed.encrypted.evaluate import check_encrypted

    model = Path(model)
    net, info = load_model(model)
    shape = tuple(info["image_shape"])
    bundle: DataBundle | None = None

    def own_data() -> DataBundle:
        nonlocal bundle
        if bundle is None:
            if data is None:
                raise ConfigError("Calibration 'private' needs the model's data (data=...).")
            bundle = data if isinstance(data, DataBundle) else load_data(data)
        return bundle

    calib, source = calibration_set(calibration, shape, calibration_images, own_data)
    he, report = compile_model(net, info, calib, source=source)
    result = None
    if check > 0:
        if data is not None:
            b = own_data()
            split = b.test if b.test is not None else b.val or b.train
            images = take(split, check)
        else:
            images = synthetic_images(shape, check)  # no data given: made-up images check
        result = check_encrypted(he, images)
        if result["same_decisions"] < 1.0:
            raise ConfigError("Encrypted and plaintext predictions disagree; the model's value "
                              "ranges are too close to CKKS's precision.")
    path = he.save(Path(out) if out is not None else default_artefact_path(model))
    return {**report, "path": path, "calibration": source, "check": result}
