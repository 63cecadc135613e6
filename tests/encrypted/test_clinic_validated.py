"""The clinic page states the model's validated performance and decides at its operating
point, calling the output a score (issue 15, item 10). In process: a stand-in client
with the card a compiled model carries, no CKKS."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from privmed.encrypted.client import EncryptedClient, Prediction
from privmed.encrypted.clinic import PAGE_HEADER, create_clinic_app
from privmed.encrypted.validated import UNRECORDED, decision_text, performance_text

OPERATING_POINT = {"positive_index": 1, "positive_class": "opacity", "threshold": 0.412,
                   "method": "youden", "target": None, "chosen_on": "val", "n": 300,
                   "within_dp_guarantee": False}
PERFORMANCE = {"split": "test", "n": 300, "roc_auc": 0.74, "roc_auc_ci": [0.685, 0.795],
               "positive_class": "opacity", "threshold": 0.412, "sensitivity": 0.807,
               "sensitivity_ci": [0.736, 0.862], "specificity": 0.6,
               "specificity_ci": [0.52, 0.675], "accuracy": 0.7,
               "accuracy_ci": [0.646, 0.749]}


def _card(**extra) -> dict:
    return {"model": "he-cnn", "input_shape": [1, 8, 8], "class_names": ["normal", "opacity"],
            "epsilon": 3.0, "delta": 1e-5, **extra}


class _Client:
    """What the clinic needs of EncryptedClient: its card and a prediction, here from
    fixed logits through EncryptedClient's own decision code."""

    def __init__(self, card: dict, logits: list[float]) -> None:
        self.card, self.class_names, self.logits = card, card["class_names"], logits

    def predict(self, image: np.ndarray) -> Prediction:
        return EncryptedClient._prediction(self, np.array(self.logits), {"total": 0.5})


def _page(card: dict, logits: list[float]) -> TestClient:
    return TestClient(create_clinic_app(_Client(card, logits)), base_url="http://127.0.0.1")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _predict(page: TestClient) -> dict:
    reply = page.post("/api/predict", files={"file": ("x.png", _png(), "image/png")},
                      headers={PAGE_HEADER: "1"})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_the_page_states_validated_performance_at_the_operating_point():
    card = _card(operating_point=OPERATING_POINT, performance=PERFORMANCE)
    model = _page(card, [0.0, 0.0]).get("/api/model").json()
    assert model["validated"] == (
        "Validated on 300 test images: ROC-AUC 0.740 (95% CI 0.685-0.795). Positive class: "
        "opacity. Decision: opacity when its score is at least 0.412, a threshold chosen by "
        "Youden's J on the validation split. At that threshold: sensitivity 0.807 (95% CI "
        "0.736-0.862) for opacity, specificity 0.600 (95% CI 0.520-0.675) for normal.")
    html = _page(card, [0.0, 0.0]).get("/").text
    assert 'id="validated"' in html and "<dt>Score</dt>" in html
    assert "Probability" not in html and "not probabilities" in html


@pytest.mark.parametrize("logits,label", [([0.0, -0.2], "opacity"),  # score 0.450 >= 0.412
                                          ([0.0, -0.5], "normal")])  # score 0.378 < 0.412
def test_a_decision_is_taken_at_the_threshold_not_at_the_larger_score(logits, label):
    card = _card(operating_point=OPERATING_POINT, performance=PERFORMANCE)
    body = _predict(_page(card, logits))
    score = float(np.exp(logits[1]) / np.exp(logits).sum())
    assert body["label"] == label and body["score"] == pytest.approx(score)
    assert body["threshold"] == 0.412 and body["positive_class"] == "opacity"
    assert "probability" not in body and "probabilities" not in body
    relation = "at least" if label == "opacity" else "below"
    assert body["decision"] == (f"{label}: the score for opacity is {score:.3f}, {relation} "
                                "the threshold 0.412.")


def test_an_old_or_multiclass_model_says_what_is_known():
    old = _page(_card(), [0.0, 1.0])
    assert old.get("/api/model").json()["validated"] == UNRECORDED
    body = _predict(old)  # no operating point recorded: the highest score decides
    assert body["label"] == "opacity" and body["threshold"] is None
    assert body["decision"].startswith("opacity: the highest score, 0.731")
    multi = _card(class_names=["grade 0", "grade 1", "grade 2"], performance={
        "split": "test", "n": 50, "accuracy": 0.62, "accuracy_ci": [0.48, 0.74],
        "macro": {"roc_auc": 0.81, "recall": 0.6, "precision": 0.61}})
    assert performance_text(multi) == (
        "Validated on 50 test images: accuracy 0.620 (95% CI 0.480-0.740), one-vs-rest "
        "ROC-AUC (macro) 0.810. Decision: the class with the highest score.")
    assert decision_text("grade 1", 0.5, None, None).endswith("(a score, not a probability).")
