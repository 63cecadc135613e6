"""A real ``privmed serve`` process on loopback, serving an he-cnn trained on synthetic
X-rays and compiled for CKKS; shared by the encrypted-inference tests."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from privmed.data import load_data
from privmed.encrypted.compiler import HEModel, calibration_images, compile_model
from privmed.encrypted.server import start_server_process, stop_process
from privmed.models import load_model
from privmed.training import TrainConfig
from privmed.training.run import train_run


@dataclass
class HEServer:
    url: str
    model_path: Path  # the trained model.pt
    artefact: Path  # the compiled .he
    he: HEModel
    process: subprocess.Popen
    log_path: Path

    def plain_logits(self, images: np.ndarray) -> np.ndarray:
        return self.he.plain_logits(np.asarray(images, dtype=np.float64).reshape(
            -1, *self.he.card["input_shape"]))

    def plain_predict(self, image: np.ndarray) -> int:
        return int(self.plain_logits(image)[0].argmax())


@pytest.fixture(scope="session")
def synthetic_bundle():
    return load_data("synthetic")


@pytest.fixture(scope="session")
def trained_he_model(tmp_path_factory, synthetic_bundle) -> Path:
    out = tmp_path_factory.mktemp("he-run")
    train_run(synthetic_bundle, out, config=TrainConfig(epochs=4, batch_size=128, lr=3e-3),
              privacy=None, model_name="he-cnn", command="test", progress=False)
    return out / "model.pt"


@pytest.fixture(scope="session")
def compiled_he(trained_he_model, synthetic_bundle, tmp_path_factory) -> tuple[HEModel, Path]:
    net, info = load_model(trained_he_model)
    he, _ = compile_model(net, info, calibration_images(synthetic_bundle.train))
    path = he.save(tmp_path_factory.mktemp("he-artefact") / "model.he")
    return he, path


@pytest.fixture(scope="session")
def server_factory():
    """``start(artefact, log_path, *extra_cli_args) -> (process, url)``."""
    return start_server_process


@pytest.fixture(scope="session")
def he_server(compiled_he, trained_he_model, tmp_path_factory) -> Iterator[HEServer]:
    he, artefact = compiled_he
    log_path = tmp_path_factory.mktemp("he-server") / "serve.log"
    proc, url = start_server_process(artefact, log_path)
    try:
        yield HEServer(url, trained_he_model, artefact, he, proc, log_path)
    finally:
        stop_process(proc)
