"""Which class is the finding, and at which score a binary model calls it.

Folders sort ``abnormal/`` before ``normal/``: taking the last class as positive made
"sensitivity" the recall of *normal*. The positive class is therefore chosen by name
(the class named like a finding, when that is unambiguous) or by ``--positive-class``.

The decision threshold (the *operating point*) is chosen on the validation split:
Youden's J by default, a target sensitivity or specificity, or a fixed value. The score
it applies to is the model's softmax output for the positive class, an uncalibrated
score, not a probability. The validation split is private data too: choosing the
threshold on it is outside the DP guarantee, like model selection (docs/privacy.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from privmed.errors import ConfigError

# Names (lower case, words joined by "_") that say "nothing found" / "something found".
NEGATIVE_NAMES = frozenset({
    "normal", "healthy", "negative", "benign", "no_finding", "no_findings", "nofinding",
    "control", "controls", "no", "none", "absent", "clear", "unremarkable", "no_disease",
    "nondisease", "clean", "ok", "neg", "non_referable", "nonreferable",
})
POSITIVE_NAMES = frozenset({
    "abnormal", "abnormality", "pneumonia", "disease", "diseased", "malignant", "malignancy",
    "positive", "opacity", "tumor", "tumour", "cancer", "lesion", "finding", "findings",
    "covid", "covid19", "covid_19", "yes", "present", "fracture", "nodule", "mass",
    "effusion", "tuberculosis", "tb", "melanoma", "carcinoma", "pathology", "pathological",
    "referable", "sick", "infected", "infection", "glaucoma", "retinopathy", "hemorrhage",
    "haemorrhage", "stroke", "pneumothorax", "pos", "anomaly", "anomalous", "suspicious",
})
# Label pairs without words: the usual convention makes the second (1, true) positive.
GENERIC_PAIRS = ({"0", "1"}, {"class_0", "class_1"}, {"false", "true"})

METHODS = ("youden", "sensitivity", "specificity", "fixed")
DEFAULT_THRESHOLD = 0.5
SCORE_MEANING = ("softmax output of the positive class: an uncalibrated score, not a "
                 "probability")
PRIVACY_NOTE = ("The threshold was chosen on the validation split, which is private data, "
                "outside the DP guarantee (like model selection): one number computed from "
                "it is released without noise.")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")


def _negative(name: str) -> bool:
    n = _norm(name)
    return n in NEGATIVE_NAMES or re.match(r"^(no|non|not)_", n) is not None


def _positive(name: str) -> bool:
    return _norm(name) in POSITIVE_NAMES


def finding_class(class_names: Sequence[str]) -> int | None:
    """Index of the class named like a finding in a two-class task, or None when the
    names do not say (or the task is not binary)."""
    if len(class_names) != 2:
        return None
    neg = [_negative(c) for c in class_names]
    if neg.count(True) == 1:
        return neg.index(False)
    pos = [_positive(c) for c in class_names]
    if pos.count(True) == 1:
        return pos.index(True)
    names = [_norm(c) for c in class_names]
    for pair in GENERIC_PAIRS:
        if set(names) == pair:
            return names.index(sorted(pair)[1])
    return None


def resolve_positive_class(class_names: Sequence[str], requested: str | None = None) -> int | None:
    """Index of the positive class: ``requested`` (a class name) or the class named like
    a finding. None for tasks with more than two classes. Raises ConfigError when a binary
    task's names do not say which class is the finding and none was requested."""
    names = [str(c) for c in class_names]
    if requested is not None:
        if len(names) != 2:
            raise ConfigError(f"--positive-class applies to two-class tasks; this one has "
                              f"{len(names)} classes ({', '.join(names)}).")
        if requested in names:
            return names.index(requested)
        hits = [i for i, c in enumerate(names) if c.lower() == requested.lower()]
        if len(hits) == 1:
            return hits[0]
        raise ConfigError(f"--positive-class '{requested}' is not one of the classes "
                          f"'{names[0]}' and '{names[1]}'.")
    if len(names) != 2:
        return None
    index = finding_class(names)
    if index is None:
        raise ConfigError(f"Cannot tell which of the classes '{names[0]}' and '{names[1]}' is "
                          f"the finding; pass --positive-class {names[1]} (or {names[0]}).")
    return index


def default_positive_class(class_names: Sequence[str]) -> tuple[int, bool]:
    """(index, assumed) for a binary task evaluated without a recorded positive class:
    the class named like a finding, else the second class with ``assumed`` True."""
    index = finding_class(class_names)
    return (1, True) if index is None else (index, False)


@dataclass(frozen=True)
class OperatingPointSpec:
    """How to choose the threshold: ``method`` with its ``target`` (the sensitivity or
    specificity to reach, or the fixed threshold)."""

    method: str = "youden"
    target: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"Operating point '{self.method}' is not one of "
                              f"{', '.join(METHODS)}.")
        if self.method == "youden":
            if self.target is not None:
                raise ConfigError("Youden's J takes no target value.")
            return
        if self.target is None or not 0.0 <= self.target <= 1.0:
            what = "threshold" if self.method == "fixed" else f"target {self.method}"
            raise ConfigError(f"The {what} must lie in [0, 1], got {self.target}.")


def parse_operating_point(spec: str | None, threshold: float | None = None
                          ) -> OperatingPointSpec:
    """``--operating-point youden|sensitivity=0.95|specificity=0.9`` or ``--threshold T``."""
    if threshold is not None:
        if spec is not None:
            raise ConfigError("Give either --operating-point or --threshold, not both.")
        return OperatingPointSpec("fixed", float(threshold))
    if spec is None or spec.strip().lower() in ("", "youden"):
        return OperatingPointSpec()
    method, _, value = spec.strip().lower().partition("=")
    method = {"sens": "sensitivity", "spec": "specificity"}.get(method, method)
    if method not in ("sensitivity", "specificity") or not value:
        raise ConfigError(f"--operating-point '{spec}' is not 'youden', 'sensitivity=X' or "
                          "'specificity=X' (use --threshold for a fixed value).")
    try:
        target = float(value)
    except ValueError:
        raise ConfigError(f"--operating-point '{spec}': '{value}' is not a number.") from None
    return OperatingPointSpec(method, target)


@dataclass(frozen=True)
class OperatingPoint:
    """The binary decision rule a model is used with: positive if its score for
    ``positive_class`` is at least ``threshold``."""

    positive_index: int
    positive_class: str
    threshold: float
    method: str  # youden | sensitivity | specificity | fixed | default
    target: float | None = None
    chosen_on: str | None = None  # "val" when chosen on the validation split
    n: int | None = None  # images it was chosen on
    val_sensitivity: float | None = None
    val_specificity: float | None = None
    note: str | None = None

    @property
    def within_dp_guarantee(self) -> bool:
        """Only a threshold fixed without looking at data is covered by the DP guarantee."""
        return self.chosen_on is None

    def describe(self) -> str:
        """How the threshold came about, e.g. "chosen by Youden's J on val (30 images)"."""
        if self.method == "fixed":
            return "fixed by the user"
        if self.method == "default" or self.chosen_on is None:
            return "the default, not tuned on any data"
        how = ("Youden's J" if self.method == "youden"
               else f"{self.method} >= {self.target:g}")
        return f"chosen by {how} on {self.chosen_on} ({self.n} images)"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["score"] = SCORE_MEANING
        d["within_dp_guarantee"] = self.within_dp_guarantee
        d["privacy_note"] = None if self.within_dp_guarantee else PRIVACY_NOTE
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OperatingPoint:
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in fields})

    def predict(self, probs: np.ndarray) -> np.ndarray:
        """Class indices decided at the threshold, for softmax outputs ``N x 2``."""
        scores = np.asarray(probs)[:, self.positive_index]
        return np.where(scores >= self.threshold, self.positive_index, 1 - self.positive_index)


def model_operating_point(info: dict[str, Any], positive_class: str | None = None
                          ) -> OperatingPoint | None:
    """The decision rule a saved model is used with (``load_model``'s info): the one
    recorded at training; for a binary model saved before privmed recorded one, the
    class named like a finding (or ``positive_class``) at the default threshold."""
    names = [str(c) for c in info["class_names"]]
    recorded = (info.get("meta") or {}).get("operating_point")
    if recorded:
        op = OperatingPoint.from_dict(recorded)
        if positive_class is not None and positive_class.lower() != op.positive_class.lower():
            raise ConfigError(f"The model was validated with positive class "
                              f"'{op.positive_class}', not '{positive_class}'; its threshold "
                              "belongs to that class.")
        return op
    index = resolve_positive_class(names, positive_class)
    if index is None:
        return None
    return OperatingPoint(index, names[index], DEFAULT_THRESHOLD, "default",
                          note="the model was saved before privmed recorded an operating "
                               "point")


def choose_operating_point(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                           positive: int, spec: OperatingPointSpec | None = None,
                           split: str = "val") -> OperatingPoint:
    """Choose the threshold on ``split``'s labels and softmax outputs ``N x 2``."""
    spec = spec or OperatingPointSpec()
    name = str(class_names[positive])
    if spec.method == "fixed":
        assert spec.target is not None
        return OperatingPoint(positive, name, float(spec.target), "fixed", spec.target)
    y = (np.asarray(labels).astype(int) == positive).astype(int)
    scores = np.asarray(probs, dtype=np.float64)[:, positive]
    if y.min() == y.max():
        return OperatingPoint(positive, name, DEFAULT_THRESHOLD, "default", spec.target,
                              note=f"the {split} split holds one class only, so the threshold "
                                   f"could not be chosen on it; the default "
                                   f"{DEFAULT_THRESHOLD} is used")
    fpr, tpr, thr = roc_curve(y, scores, drop_intermediate=False)
    finite = np.isfinite(thr) & (thr <= 1.0)  # the first threshold is +inf: nothing positive
    fpr, tpr, thr = fpr[finite], tpr[finite], thr[finite]
    if spec.method == "youden":
        i = int(np.argmax(tpr - fpr))  # first maximum: the highest threshold among ties
    elif spec.method == "sensitivity":
        # The highest threshold that reaches the target: the best specificity there.
        i = int(np.flatnonzero(tpr >= spec.target - 1e-12)[0])
    else:
        ok = np.flatnonzero(1.0 - fpr >= spec.target - 1e-12)
        i = int(ok[-1]) if ok.size else 0  # the lowest threshold that keeps the target
    note = None
    if spec.method == "specificity" and 1.0 - fpr[i] < spec.target - 1e-12:
        note = (f"no threshold reaches specificity {spec.target:g} on the {split} split; "
                "the highest one is used")
    return OperatingPoint(positive, name, float(thr[i]), spec.method, spec.target, split,
                          int(y.size), float(tpr[i]), float(1.0 - fpr[i]), note)
