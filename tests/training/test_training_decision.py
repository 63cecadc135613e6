"""Positive class, operating point and 95 % intervals (issue 15, items 1-3)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from privmed.errors import ConfigError
from privmed.training.decision import (
    OperatingPoint,
    OperatingPointSpec,
    choose_operating_point,
    model_operating_point,
    parse_operating_point,
    resolve_positive_class,
)
from privmed.training.intervals import auc_ci, delong_auc_variance, wilson_ci
from privmed.training.metrics import compute_metrics

# --------------------------------------------------------------------------- intervals


def test_wilson_interval_matches_known_values():
    assert wilson_ci(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-4)
    assert wilson_ci(10, 10) == pytest.approx([0.7225, 1.0], abs=1e-4)  # never [1, 1]
    assert wilson_ci(0, 0) is None


def _delong_by_definition(pos, neg):
    """DeLong's structural components straight from the definition (loops, ties = 1/2)."""
    psi = np.array([[1.0 if x > y else 0.5 if x == y else 0.0 for y in neg] for x in pos])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return psi.mean(), v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)


def test_delong_variance_on_a_hand_checked_example():
    # Positives 0.9, 0.8, 0.4; negatives 0.5, 0.3, 0.2: 8 of 9 pairs ordered, AUC 8/9;
    # components (1, 1, 2/3) and (2/3, 1, 1), each sample variance 1/27: var = 2/81.
    labels = np.array([1, 1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.4, 0.5, 0.3, 0.2])
    auc, var = delong_auc_variance(labels, scores)
    assert auc == pytest.approx(8 / 9) and var == pytest.approx(2 / 81)


def test_delong_matches_the_definition_with_ties_and_a_bootstrap():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounding makes ties
    auc, var = delong_auc_variance(labels, scores)
    ref_auc, ref_var = _delong_by_definition(scores[labels == 1], scores[labels == 0])
    assert auc == pytest.approx(ref_auc) == pytest.approx(roc_auc_score(labels, scores))
    assert var == pytest.approx(ref_var, rel=1e-12)
    boot = []
    for _ in range(1000):  # Mann-Whitney AUC of each resample (mid-ranks handle ties)
        i = rng.integers(0, labels.size, labels.size)
        pos = labels[i] == 1
        ranks = rankdata(scores[i])
        m, n = pos.sum(), (~pos).sum()
        boot.append((ranks[pos].sum() - m * (m + 1) / 2) / (m * n))
    assert np.var(boot) == pytest.approx(var, rel=0.15)
    lo, hi = auc_ci(labels, scores)
    assert lo == pytest.approx(auc - 1.959964 * var ** 0.5)
    assert hi == pytest.approx(auc + 1.959964 * var ** 0.5)


def test_auc_interval_is_missing_rather_than_falsely_certain():
    assert auc_ci([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) is None  # perfect: variance 0
    assert auc_ci([1, 0, 0], [0.9, 0.8, 0.2]) is None  # one positive


# --------------------------------------------------------------------------- positive class


@pytest.mark.parametrize("names,positive", [
    (["abnormal", "normal"], 0),  # folder order: today's "last class" would be normal
    (["normal", "pneumonia"], 1),
    (["Benign", "Malignant"], 1),
    (["pneumonia", "no_pneumonia"], 0),
    (["healthy", "DR"], 1),
    (["No Finding", "Effusion"], 1),
    (["tumour", "control"], 0),
    (["class_0", "class_1"], 1),
    (["0", "1"], 1),
])
def test_positive_class_is_the_class_named_like_a_finding(names, positive):
    assert resolve_positive_class(names) == positive


@pytest.mark.parametrize("names", [["cats", "dogs"], ["normal", "healthy"],
                                   ["pneumonia", "tumour"]])
def test_a_binary_task_without_a_clear_finding_asks_for_one(names):
    with pytest.raises(ConfigError, match="--positive-class") as info:
        resolve_positive_class(names)
    assert str(info.value).count(".") >= 1 and "\n" not in str(info.value)


def test_positive_class_option():
    assert resolve_positive_class(["cats", "dogs"], "cats") == 0
    assert resolve_positive_class(["abnormal", "normal"], "NORMAL") == 1
    with pytest.raises(ConfigError, match="'tumor' is not one of the classes"):
        resolve_positive_class(["abnormal", "normal"], "tumor")
    with pytest.raises(ConfigError, match="two-class tasks"):
        resolve_positive_class(["a", "b", "c"], "a")
    assert resolve_positive_class(["a", "b", "c"]) is None


# --------------------------------------------------------------------------- operating point


def test_parse_operating_point():
    assert parse_operating_point(None) == OperatingPointSpec("youden")
    assert parse_operating_point("sensitivity=0.95") == OperatingPointSpec("sensitivity", 0.95)
    assert parse_operating_point("spec=0.9") == OperatingPointSpec("specificity", 0.9)
    assert parse_operating_point(None, 0.3) == OperatingPointSpec("fixed", 0.3)
    for bad, words in (("sensitivity", "is not"), ("sensitivity=x", "not a number"),
                       ("sensitivity=1.5", "[0, 1]"), ("f1", "is not")):
        with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
            parse_operating_point(bad)
    with pytest.raises(ConfigError, match="not both"):
        parse_operating_point("youden", 0.3)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        parse_operating_point(None, 1.2)


# Validation scores of the positive class (index 1) and labels; positives are 1.
VAL_SCORES = np.array([0.95, 0.9, 0.8, 0.7, 0.65, 0.6, 0.4, 0.35, 0.3, 0.2, 0.1, 0.05])
VAL_LABELS = np.array([1, 1, 1, 0, 1, 1, 0, 1, 0, 0, 0, 0])
VAL_PROBS = np.stack([1 - VAL_SCORES, VAL_SCORES], axis=1)


def test_youden_threshold_is_chosen_on_validation_scores():
    op = choose_operating_point(VAL_LABELS, VAL_PROBS, ["normal", "opacity"], 1)
    # At 0.6: 5 of 6 positives (0.833) and 5 of 6 negatives (0.833): J = 0.667, the best.
    assert op.threshold == 0.6 and op.method == "youden" and op.chosen_on == "val"
    assert op.val_sensitivity == pytest.approx(5 / 6) and op.val_specificity == pytest.approx(5 / 6)
    assert not op.within_dp_guarantee and "outside the DP guarantee" in op.to_dict()[
        "privacy_note"]
    assert list(op.predict(VAL_PROBS)) == [int(s >= 0.6) for s in VAL_SCORES]


def test_target_sensitivity_and_specificity_and_fixed_thresholds():
    names = ["normal", "opacity"]
    sens = choose_operating_point(VAL_LABELS, VAL_PROBS, names, 1,
                                  OperatingPointSpec("sensitivity", 0.95))
    # Every positive is found first at 0.35: the highest threshold reaching 95 %.
    assert sens.threshold == 0.35 and sens.val_sensitivity == 1.0
    assert sens.val_specificity == pytest.approx(4 / 6)
    spec = choose_operating_point(VAL_LABELS, VAL_PROBS, names, 1,
                                  OperatingPointSpec("specificity", 1.0))
    assert spec.threshold == 0.8 and spec.val_specificity == 1.0  # the lowest keeping 100 %
    fixed = choose_operating_point(VAL_LABELS, VAL_PROBS, names, 1,
                                   OperatingPointSpec("fixed", 0.3))
    assert fixed.threshold == 0.3 and fixed.chosen_on is None and fixed.within_dp_guarantee
    one_class = choose_operating_point(np.ones(4, int), VAL_PROBS[:4], names, 1)
    assert one_class.threshold == 0.5 and one_class.method == "default"
    assert "one class only" in one_class.note


def test_a_model_without_a_recorded_operating_point_gets_the_named_finding():
    info = {"class_names": ["abnormal", "normal"], "meta": {}}
    op = model_operating_point(info)
    assert (op.positive_class, op.threshold, op.method) == ("abnormal", 0.5, "default")
    recorded = OperatingPoint(1, "normal", 0.3, "youden", chosen_on="val", n=10).to_dict()
    info["meta"]["operating_point"] = recorded
    assert model_operating_point(info).threshold == 0.3
    with pytest.raises(ConfigError, match="validated with positive class 'normal'"):
        model_operating_point(info, "abnormal")
    assert model_operating_point({"class_names": ["a", "b", "c"], "meta": {}}) is None


# --------------------------------------------------------------------------- metrics


def test_binary_metrics_are_about_the_positive_class_at_the_threshold():
    # Class 0 "abnormal" is the finding: 8 of 10 found; class 1 "normal": 3 of 5 cleared.
    labels = np.array([0] * 10 + [1] * 5)
    abnormal_score = np.array([0.9] * 8 + [0.2] * 2 + [0.7] * 2 + [0.1] * 3)
    probs = np.stack([abnormal_score, 1 - abnormal_score], axis=1)
    op = OperatingPoint(0, "abnormal", 0.5, "youden", chosen_on="val", n=30)
    m = compute_metrics(labels, probs, class_names=["abnormal", "normal"], operating_point=op)
    assert m["positive_class"] == "abnormal" and m["threshold"] == 0.5
    assert m["sensitivity"] == 0.8 and m["specificity"] == 0.6
    assert m["sensitivity_ci"] == pytest.approx(wilson_ci(8, 10))
    assert m["specificity_ci"] == pytest.approx(wilson_ci(3, 5))
    assert m["accuracy"] == pytest.approx(11 / 15)
    assert m["accuracy_ci"] == pytest.approx(wilson_ci(11, 15))
    assert m["confusion_matrix"] == [[8, 2], [2, 3]]  # rows true, columns predicted
    assert m["roc_auc"] == pytest.approx(roc_auc_score(labels == 0, abnormal_score))
    # A lower threshold moves every figure: 0.15 calls the two 0.2s abnormal too.
    low = compute_metrics(labels, probs, class_names=["abnormal", "normal"],
                          operating_point=OperatingPoint(0, "abnormal", 0.15, "fixed"))
    assert low["sensitivity"] == 1.0 and low["specificity"] == 0.6
    # Without an operating point the named finding is still the positive class.
    default = compute_metrics(labels, probs, class_names=["abnormal", "normal"])
    assert default["positive_class"] == "abnormal" and default["sensitivity"] == 0.8
    assert "positive_class_assumed" not in default
    assert compute_metrics(labels, probs, class_names=["x", "y"])["positive_class_assumed"]


def test_multiclass_metrics_per_class_and_named_averages():
    from sklearn.metrics import cohen_kappa_score, precision_score, recall_score

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 400)
    logits = rng.normal(size=(400, 5))
    logits[np.arange(400), labels] += 1.2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    preds = probs.argmax(axis=1)
    names = [f"grade {i}" for i in range(5)]
    m = compute_metrics(labels, probs, class_names=names)
    assert m["sensitivity"] is None and m["specificity"] is None  # no unlabelled macro line
    assert [c["class"] for c in m["per_class"]] == names
    np.testing.assert_allclose([c["recall"] for c in m["per_class"]],
                               recall_score(labels, preds, average=None))
    np.testing.assert_allclose([c["precision"] for c in m["per_class"]],
                               precision_score(labels, preds, average=None))
    np.testing.assert_allclose([c["roc_auc"] for c in m["per_class"]],
                               [roc_auc_score(labels == c, probs[:, c]) for c in range(5)])
    for how in ("macro", "weighted"):
        assert m[how]["recall"] == pytest.approx(recall_score(labels, preds, average=how))
        assert m[how]["precision"] == pytest.approx(precision_score(labels, preds, average=how))
        assert m[how]["roc_auc"] == pytest.approx(
            roc_auc_score(labels, probs, multi_class="ovr", average=how))
    assert m["roc_auc"] == m["macro"]["roc_auc"]
    assert m["quadratic_weighted_kappa"] == pytest.approx(
        cohen_kappa_score(labels, preds, weights="quadratic"))
    assert all(c["recall_ci"][0] < c["recall"] < c["recall_ci"][1] for c in m["per_class"])
    assert [c["class"] for c in m["roc_curves"]] == names


def test_operating_point_options_are_refused_for_more_than_two_classes(tmp_path):
    import torch

    from privmed.data import DataBundle
    from privmed.data.dataset import ImageDataset
    from privmed.training.run import train_run

    images = torch.rand(30, 1, 8, 8)
    ds = ImageDataset(images, torch.arange(30) % 3, ("grade 0", "grade 1", "grade 2"))
    with pytest.raises(ConfigError, match="two-class tasks"):
        train_run(DataBundle(ds, ds), tmp_path / "run", privacy=None, progress=False,
                  operating_point=OperatingPointSpec("fixed", 0.3))
    assert not (tmp_path / "run").exists()


def test_console_names_multiclass_averages_and_never_prints_a_macro_sensitivity():
    from rich.console import Console

    from privmed.cli.metrics_view import print_metrics

    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 90)
    probs = rng.dirichlet(np.ones(3), 90)
    names = ["grade 0", "grade 1", "grade [2]"]
    m = compute_metrics(labels, probs, class_names=names)
    console = Console(record=True, width=200)
    print_metrics(console, {"test": m}, classes=names)
    text = console.export_text()
    for words in ("recall, macro", "recall, weighted", "precision, macro",
                  "ROC-AUC one-vs-rest, macro", "quadratic weighted kappa", "Per class (test)",
                  "grade [2]", "ordered grades in this order: grade 0 < grade 1 < grade [2]"):
        assert words in text, words
    assert "sensitivity" not in text.lower() and "specificity" not in text.lower()
    assert f"{m['per_class'][2]['recall']:.3f} ({m['per_class'][2]['recall_ci'][0]:.3f}-" in text
