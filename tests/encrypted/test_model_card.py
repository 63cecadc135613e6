"""The public model card of a real ``privmed serve`` must hold nothing computed from the
private training images: the per-stage maxima it used to publish are gone, and the
output scale is calibrated on synthetic images unless the card says otherwise."""

from __future__ import annotations

import json

import httpx
import numpy as np
from cli_run import privmed
from he_http import serving

from privmed.data import load_data, make_synthetic
from privmed.encrypted.calibration import PRIVATE
from privmed.encrypted.compiler import HEModel, level_limits


def _other_private_set(path) -> str:
    """A second, different set of training images (a MedMNIST-style .npz)."""
    bundle = make_synthetic(n_train=400, n_val=50, n_test=50, seed=7)
    arrays = {}
    for split in ("train", "val", "test"):
        ds = getattr(bundle, split)
        arrays[f"{split}_images"] = ds.to_uint8()  # N x 28 x 28
        arrays[f"{split}_labels"] = ds.labels.numpy()[:, None]
    np.savez(path, **arrays)
    return str(path)


def _numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return [float(value)] if isinstance(value, int | float) and not isinstance(value, bool) \
        else []


def test_the_served_card_holds_nothing_from_the_private_training_images(
        trained_he_model, tmp_path):
    private_sets = {"a": "synthetic", "b": _other_private_set(tmp_path / "other.npz")}
    cards, maxima = {}, {}
    for name, data in private_sets.items():
        out = tmp_path / f"{name}.he"
        proc = privmed("encrypted", "compile", str(trained_he_model), "--data", data,
                       "--out", str(out), "--check", "2", "--calibration-images", "500")
        assert proc.returncode == 0, proc.stderr
        with serving(out, tmp_path) as (_, url):
            cards[name] = httpx.get(f"{url}/v1/model").json()
        he = HEModel.load(out)
        train = load_data(data).train.images.numpy()
        maxima[name] = [float(np.abs(v).max()) for v in he.stages(train).values()]
    # Compiled against two different private data sets, the public cards are identical.
    assert cards["a"] == cards["b"]
    card = cards["a"]
    assert card["calibration"] == "synthetic"
    assert card["ranges"] == {stage: {"limit": limit} for stage, limit in
                              level_limits(HEModel.load(tmp_path / "a.he").params).items()}
    assert "dataset_id" not in card and '"max"' not in json.dumps(card)
    published = _numbers(card)
    for value in maxima["a"] + maxima["b"]:  # no activation maximum on private images
        assert not any(np.isclose(value, x, rtol=1e-6) for x in published), value


def test_a_private_calibration_or_an_old_artefact_is_named_in_the_card(
        trained_he_model, compiled_he, tmp_path):
    out = tmp_path / "private.he"
    proc = privmed("encrypted", "compile", str(trained_he_model), "--data", "synthetic",
                   "--calibration", "private", "--out", str(out), "--check", "0",
                   "--calibration-images", "300")
    assert proc.returncode == 0, proc.stderr
    assert HEModel.load(out).card["calibration"] == PRIVATE
    # An artefact from before this fix carried maxima and a dataset hash in its card.
    old = HEModel.load(compiled_he[1])
    old.card.pop("calibration")
    old.card["ranges"] = {s: {"max": 1.2345, "limit": 16.0} for s in ("conv", "output")}
    old.card["dataset_id"] = "0123456789abcdef"
    old_path = old.save(tmp_path / "old.he")
    with serving(old_path, tmp_path) as (_, url):
        card = httpx.get(f"{url}/v1/model").json()
    assert card["calibration"].startswith("unrecorded")
    assert "dataset_id" not in card and "1.2345" not in json.dumps(card)
