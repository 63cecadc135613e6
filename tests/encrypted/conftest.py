"""A real ``privmed serve`` process on loopback, serving an he-cnn trained on synthetic
X-rays and compiled for CKKS; shared by the encrypted-inference tests."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from procs import ENV, start, stop, wait_until

from privmed.data import load_data
from privmed.encrypted.calibration import SYNTHETIC, synthetic_images
from privmed.encrypted.compiler import HEModel, compile_model
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
        """The plaintext decision: at the card's operating point for a binary model."""
        logits = self.plain_logits(image)[0]
        op = self.he.card.get("operating_point")
        if not op:
            return int(logits.argmax())
        scores = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        pos = int(op["positive_index"])
        return pos if scores[pos] >= op["threshold"] else 1 - pos


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
    he, _ = compile_model(net, info, synthetic_images(tuple(info["image_shape"])),
                          source=SYNTHETIC)
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


@pytest.fixture(scope="session")
def clinic_url(he_server, tmp_path_factory) -> Iterator[str]:
    """``run_clinic`` in its own process on a loopback port, connected to ``he_server``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = ("import sys; from privmed.encrypted.clinic import run_clinic; "
            "run_clinic(sys.argv[1], host='127.0.0.1', port=int(sys.argv[2]))")
    log_path = tmp_path_factory.mktemp("clinic") / "clinic.log"  # a file, not a pipe
    proc = start([sys.executable, "-c", code, he_server.url, str(port)], log_path,
                 env={**ENV, "PYTHONUNBUFFERED": "1"})

    def listening() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"privmed clinic exited early: {log_path.read_text()[-500:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    try:
        wait_until(listening, 120, "privmed clinic to listen on its port", interval=0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc, timeout=20)
