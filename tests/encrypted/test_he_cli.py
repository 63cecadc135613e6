"""``privmed encrypted compile``, ``serve`` and ``infer`` as a user runs them."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from cli_run import assert_one_sentence_error, privmed
from PIL import Image


def _png(path: Path, image: np.ndarray) -> Path:
    Image.fromarray(np.round(image[0] * 255).astype(np.uint8)).save(path)
    return path


def test_compile_writes_an_artefact_that_serves(trained_he_model, tmp_path):
    out = tmp_path / "m.he"
    proc = privmed("encrypted", "compile", str(trained_he_model), "--data", "synthetic",
                   "--out", str(out), "--check", "2", "--calibration-images", "300")
    assert proc.returncode == 0, proc.stderr
    assert "same decision on 100%" in proc.stdout and "128-bit" in proc.stdout
    assert out.is_file()
    assert out.stat().st_mode & 0o777 == 0o600  # the model's weights: owner only


def test_compile_refuses_a_model_with_relu_in_one_sentence(tmp_path):
    proc = privmed("train", "--data", "synthetic", "--no-dp", "--epochs", "1", "--model",
                   "small-cnn", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    proc = privmed("encrypted", "compile", str(tmp_path / "run" / "model.pt"), "--data",
                   "synthetic")
    assert_one_sentence_error(proc, 2, "cannot be served encrypted")


def test_infer_single_and_batch_print_the_plaintext_class(he_server, synthetic_bundle,
                                                          tmp_path):
    images = synthetic_bundle.test.images[:2].numpy()
    files = [_png(tmp_path / f"x{i}.png", im) for i, im in enumerate(images)]
    # the PNG round trip quantises pixels: compare with the model on the quantised image
    expected = [he_server.he.card["class_names"][he_server.plain_predict(
        np.asarray(Image.open(f), dtype=np.float64)[None] / 255.0)] for f in files]
    # one request per image here; the batch encoding is checked image by image against
    # plaintext in test_server.py (a batch request costs ~15 s whatever it holds)
    proc = privmed("infer", "--server", he_server.url, *map(str, files))
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if ".png" in line]
    assert [next(c for c in he_server.he.card["class_names"] if c in r) for r in rows] \
        == expected


def test_infer_errors_are_one_sentence(he_server, tmp_path):
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert_one_sentence_error(privmed("infer", "--server", he_server.url, str(corrupt)), 2,
                              "bad.png")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    good = _png(tmp_path / "ok.png", np.zeros((1, 28, 28)))
    assert_one_sentence_error(privmed("infer", "--server", f"http://127.0.0.1:{port}",
                                      str(good)), 4, "cannot be reached")


def test_serve_refuses_an_uncompiled_model(trained_he_model):
    assert_one_sentence_error(privmed("serve", str(trained_he_model)), 2, "encrypted compile")


def test_infer_json_and_csv_agree_with_the_table_and_the_log_has_each_line_once(
        he_server, synthetic_bundle, tmp_path):
    import csv
    import json

    files = [_png(tmp_path / f"x{i}.png", im)
             for i, im in enumerate(synthetic_bundle.test.images[:3].numpy())]
    proc = privmed("infer", "--server", he_server.url, *map(str, files), "--json", "-",
                   "--csv", str(tmp_path / "out.csv"))
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)["predictions"]  # stdout is only the JSON
    assert [r["image"] for r in records] == [str(f) for f in files]
    classes = he_server.he.card["class_names"]
    for r in records:
        assert set(r["scores"]) == set(classes) and abs(sum(r["scores"].values()) - 1) < 1e-6
        assert r["decision"] in classes and r["decision"] in proc.stderr  # the table
    with (tmp_path / "out.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["decision"] for row in rows] == [r["decision"] for r in records]
    assert [float(row["score"]) for row in rows] == pytest.approx([r["score"] for r in records])
    assert "trained at ε = none (no DP)" in proc.stderr
    # privmed serve logs each request once (one handler, no propagation to the root logger)
    lines = [line for line in he_server.log_path.read_text().splitlines()
             if "privmed.serve" in line]
    assert lines and len(lines) == len(set(lines))


def test_epsilon_is_rounded_for_people():
    from privmed.encrypted.predictions_out import epsilon_text

    assert epsilon_text({"epsilon": 2.9912345678901234, "delta": 1e-5}) == "2.99, δ = 1e-05"
    assert epsilon_text({"epsilon": None}) == "none (no DP)"
