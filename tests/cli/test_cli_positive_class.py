"""A PNG folder of ``abnormal/`` + ``normal/`` (sorted order puts *normal* last): the
finding is the positive class everywhere a sensitivity is printed, at a threshold chosen
on the validation split (issue 15, items 1-3). In process, on 160 tiny images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from privmed.cli import app
from privmed.data import make_synthetic
from privmed.errors import ConfigError
from privmed.models import load_model


def _folder(root: Path, names: tuple[str, str] = ("abnormal", "normal")) -> Path:
    """Synthetic X-rays as PNGs in ``train/`` and ``val/``: opacity images under
    names[0], normal ones under names[1]."""
    bundle = make_synthetic(n_train=120, n_val=40, n_test=0, size=16, seed=5)
    for split in ("train", "val"):
        ds = getattr(bundle, split)
        for i, (img, label) in enumerate(zip(ds.to_uint8(), ds.labels.tolist(), strict=True)):
            d = root / split / names[0 if label == 1 else 1]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


def _run(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=True, env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pos")
    data, out = _folder(tmp / "xrays"), tmp / "run"
    result = _run("train", "--data", str(data), "--no-dp", "--epochs", "3", "--batch-size",
                  "32", "--lr", "3e-2", "--out", str(out))
    assert result.exit_code == 0, result.output
    return data, out, result.output


def test_the_finding_is_positive_and_named_next_to_every_sensitivity(trained):
    data, out, console = trained
    r = json.loads((out / "results.json").read_text())
    assert r["schema"] == "privmed.results/2"
    assert r["data"]["classes"] == ["abnormal", "normal"]
    op = r["operating_point"]
    assert op["positive_class"] == "abnormal" and op["method"] == "youden"
    assert op["chosen_on"] == "val" and op["within_dp_guarantee"] is False
    m = r["metrics"]["val"]
    assert m["positive_class"] == "abnormal" and m["threshold"] == op["threshold"]
    cm = m["confusion_matrix"]  # rows true [abnormal, normal]
    assert m["sensitivity"] == pytest.approx(cm[0][0] / sum(cm[0]))  # recall of abnormal
    assert m["specificity"] == pytest.approx(cm[1][1] / sum(cm[1]))
    assert m["sensitivity"] == pytest.approx(op["val_sensitivity"])
    for key in ("roc_auc_ci", "sensitivity_ci", "specificity_ci", "accuracy_ci"):
        assert m[key] is None or 0 <= m[key][0] <= m[key.removesuffix("_ci")] <= m[key][1]
    assert "recall of abnormal" in console and "recall of normal" in console
    assert f"{op['threshold']:.3f}" in console and "outside the DP guarantee" in console
    html = (out / "report.html").read_text()
    assert "Sensitivity: recall of abnormal" in html and "Positive class (the finding)" in html
    assert "outside the DP guarantee" in html and "operating point" in html

    # The model carries its operating point; evaluate applies it and names the class.
    model, info = load_model(out)
    assert info["meta"]["operating_point"]["threshold"] == op["threshold"]
    evaluated = _run("evaluate", str(out), "--data", str(data), "--split", "val")
    assert evaluated.exit_code == 0, evaluated.output
    assert "recall of abnormal" in evaluated.output
    assert f"{m['sensitivity']:.3f} ({m['sensitivity_ci'][0]:.3f}-" in evaluated.output
    assert f"{op['threshold']:.3f}" in evaluated.output


def test_positive_class_option_and_fixed_threshold(trained, tmp_path):
    data, _, _ = trained
    out = tmp_path / "run"
    result = _run("train", "--data", str(data), "--no-dp", "--epochs", "1", "--batch-size",
                  "64", "--out", str(out), "--positive-class", "normal", "--threshold", "0.3")
    assert result.exit_code == 0, result.output
    r = json.loads((out / "results.json").read_text())
    op, m = r["operating_point"], r["metrics"]["val"]
    assert (op["positive_class"], op["method"], op["threshold"]) == ("normal", "fixed", 0.3)
    assert op["within_dp_guarantee"] is True and op["privacy_note"] is None
    assert m["sensitivity"] == pytest.approx(m["confusion_matrix"][1][1]
                                             / sum(m["confusion_matrix"][1]))
    # The decision really is "score of normal >= 0.3".
    model, info = load_model(out)
    from privmed.data import load_data

    val = load_data(data).val
    with torch.no_grad():
        scores = torch.softmax(model(val.images), dim=1)[:, 1].numpy()
    pred_normal = scores >= 0.3
    true_normal = val.labels.numpy() == 1
    assert m["sensitivity"] == pytest.approx((pred_normal & true_normal).sum()
                                             / true_normal.sum())


def test_ambiguous_class_names_ask_for_positive_class_before_training(tmp_path):
    data = _folder(tmp_path / "pets", ("cats", "dogs"))
    out = tmp_path / "run"
    result = _run("train", "--data", str(data), "--no-dp", "--epochs", "1", "--out", str(out))
    assert isinstance(result.exception, ConfigError)
    assert "--positive-class" in str(result.exception)
    assert not out.exists()  # refused before anything was written or trained
