"""The membership audit per patient: a patient's images are IN or OUT together (every
shadow, the canary draw), patients are scored and counted, and the claim is per patient;
per image on the same data, nothing is grouped.

Real training on small synthetic data with three images per patient (ids ``p<i // 3>``
in train, ``q<i // 3>`` in val): a patient-level DP run, shadows and canary runs of
ScatterNet linear heads, a few seconds on one CPU thread.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from privmed.audit import membership
from privmed.audit.membership import audit_membership, one_run_audit, read_recipe
from privmed.audit.patients import unit_claim, unit_scores
from privmed.data import make_synthetic
from privmed.data.dataset import DataBundle, ImageDataset
from privmed.errors import ConfigError, DataError
from privmed.privacy import PrivacyConfig
from privmed.privacy.group import group_privacy
from privmed.training import TrainConfig
from privmed.training.run import train_run

MODEL = "scatter-linear"
CONFIG = TrainConfig(epochs=2, batch_size=16, physical_batch_size=16, lr=0.05, ema_decay=None,
                     lr_schedule="constant", num_threads=1)


def _with_patients(ds: ImageDataset, tag: str) -> ImageDataset:
    return ImageDataset(ds.images, ds.labels, ds.class_names, ds.name,
                        [f"{tag}{i // 3}" for i in range(len(ds))])


@pytest.fixture(scope="module")
def plain():
    return make_synthetic(n_train=36, n_val=36, n_test=12, seed=3)


@pytest.fixture(scope="module")
def bundle(plain):
    """12 training and 12 validation patients of 3 images each; same dataset id."""
    return DataBundle(_with_patients(plain.train, "p"), _with_patients(plain.val, "q"),
                      plain.test, source="synthetic")


@pytest.fixture(scope="module")
def run(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("patients") / "run"
    torch.manual_seed(0)
    # a fixed noise multiplier and RDP: no calibration, accounting in milliseconds
    train_run(bundle, out, model_name=MODEL, config=CONFIG,
              privacy=PrivacyConfig(noise_multiplier=1.0, accountant="rdp"), progress=False,
              say=lambda _: None)
    return out


def _spy(monkeypatch):
    """Record what the audit hands to train_shadows (population, IN/OUT masks) and the
    training set and privacy of every fit() it makes; the real functions still run."""
    seen: dict[str, list] = {"shadows": [], "fits": []}
    real_shadows, real_fit = membership.train_shadows, membership.fit

    def shadows(population, keep, **kwargs):
        seen["shadows"].append((population, keep.copy()))
        return real_shadows(population, keep, **kwargs)

    def fit(model, train, val, config, privacy=None, *args, **kwargs):
        seen["fits"].append((train, privacy))
        return real_fit(model, train, val, config, privacy, *args, **kwargs)

    monkeypatch.setattr(membership, "train_shadows", shadows)
    monkeypatch.setattr(membership, "fit", fit)
    return seen


def _flags_by_patient(ids, flags: np.ndarray) -> dict[str, set]:
    out: dict[str, set] = {}
    for pid, flag in zip(ids, flags.tolist(), strict=True):
        out.setdefault(pid, set()).add(flag)
    return out


def _images_in(training: ImageDataset, everyone: ImageDataset) -> dict[str, int]:
    """Images of each of ``everyone``'s patients in ``training`` (0 when absent)."""
    counts = Counter(training.patient_ids)
    return {p: counts.get(p, 0) for p in set(everyone.patient_ids)}


def test_per_patient_audit_moves_all_of_a_patients_images_together(run, bundle, monkeypatch):
    seen = _spy(monkeypatch)
    m = audit_membership(run, bundle, shadows=2)["membership"]  # auto: the run's unit
    json.dumps(m, allow_nan=False)
    results = json.loads((run / "results.json").read_text())["privacy"]
    assert results["unit"] == "patient"
    assert m["unit"] == m["claimed_unit"] == m["run_unit"] == "patient"
    assert m["claimed_epsilon"] == results["epsilon"] and m["delta"] == results["delta"]
    assert m["members"] == m["nonmembers"] and m["examples"] == 2 * m["members"]
    assert 2 <= m["members"] <= 12 and m["images"] == 3 * m["examples"]  # counted in patients
    assert m["score_aggregation"] and m["eps_lb"] <= m["claimed_epsilon"] and m["consistent"]
    # the membership masks: every shadow has each patient's images all IN or all OUT
    ((population, keep),) = seen["shadows"]
    assert keep.shape == (2, m["images"])
    for k in range(2):
        flags = _flags_by_patient(population.patient_ids, keep[k])
        assert len(flags) == m["examples"] and all(len(f) == 1 for f in flags.values())
    # ... and the shadows train at the run's unit, on whole patients
    assert len(seen["fits"]) == 2
    for train, privacy in seen["fits"]:
        assert privacy.unit == "patient" and train.patient_ids is not None
        assert set(_images_in(train, population).values()) <= {0, 3}

    # the one-run audit's canaries: whole patients in or out
    seen["fits"].clear()
    recipe = read_recipe(run, bundle)
    o = one_run_audit(bundle, model_name=MODEL, config=CONFIG, privacy=recipe.privacy,
                      canaries=6, seed=1)["one_run"]
    assert o["unit"] == o["claimed_unit"] == "patient" and o["canary_images"] == 18
    assert 0 < o["included"] < 6 and o["claimed_epsilon"] is not None
    ((training, privacy),) = seen["fits"]
    assert privacy.unit == "patient"
    present = _images_in(training, bundle.train)
    assert set(present.values()) == {0, 3}  # left-out canary patients lose all 3 images
    assert sum(v == 0 for v in present.values()) == 6 - o["included"]


def test_image_mode_on_the_same_data_does_not_group(run, bundle, monkeypatch):
    seen = _spy(monkeypatch)
    m = audit_membership(run, bundle, shadows=2, unit="image")["membership"]
    assert m["unit"] == m["claimed_unit"] == "image" and m["run_unit"] == "patient"
    assert m["examples"] == m["images"] == 72 and m["score_aggregation"] is None
    # per image, a per-patient ε covers one changed patient: group privacy of 2
    results = json.loads((run / "results.json").read_text())["privacy"]
    eps2, delta2 = group_privacy(results["epsilon"], results["delta"], 2)
    assert m["claimed_epsilon"] == pytest.approx(eps2) and m["delta"] == pytest.approx(delta2)
    assert "group privacy of 2" in m["claim_basis"]
    ((population, keep),) = seen["shadows"]
    split = [p for k in range(2) for p, f in
             _flags_by_patient(population.patient_ids, keep[k]).items() if len(f) == 2]
    assert split  # some patient has images on both sides of a shadow
    # the shadows are still trained at the run's unit (patient-level DP-SGD)
    assert all(privacy.unit == "patient" for _, privacy in seen["fits"])

    seen["fits"].clear()
    o = one_run_audit(bundle, model_name=MODEL, config=CONFIG,
                      privacy=read_recipe(run, bundle).privacy, canaries=12, seed=1,
                      unit="image")["one_run"]
    assert o["unit"] == "image" and o["canary_images"] == 12
    ((training, _),) = seen["fits"]
    assert {1, 2} & set(_images_in(training, bundle.train).values())  # patients split


def test_unit_claims_and_scores():
    ids = [f"p{i // 4}" for i in range(8)] + ["p9"]  # the largest patient has 4 images
    train = ImageDataset(torch.zeros(9, 1, 4, 4), torch.zeros(9), ("a", "b"), "train", ids)
    per_image = {"enabled": True, "epsilon": 1.0, "delta": 1e-5, "unit": "image"}
    claim = unit_claim(per_image, "patient", train)
    assert (claim["epsilon"], claim["delta"]) == pytest.approx(group_privacy(1.0, 1e-5, 4))
    assert "4 images" in claim["basis"] and claim["run_unit"] == "image"
    assert unit_claim(per_image, "image", train)["basis"] == "as trained"
    older = {"enabled": True, "epsilon": 1.0, "delta": 1e-5}  # results without a unit
    assert unit_claim(older, "image", train)["epsilon"] == 1.0
    void = unit_claim({**per_image, "epsilon": 40.0, "delta": 0.01}, "patient", train)
    assert void["epsilon"] is None and "no guarantee" in void["basis"]
    none = unit_claim({"enabled": False}, "patient", train)
    assert none["epsilon"] is None and none["delta"] == pytest.approx(0.01)  # 3 patients
    group = np.array([0, 0, 1, 2, 2, 2])
    scores = np.array([1.0, 3.0, -1.0, 0.0, 3.0, 6.0])
    assert unit_scores(scores, group, 3).tolist() == [2.0, -1.0, 3.0]


def _one_sentence(error: Exception) -> str:
    text = str(error)
    assert text.endswith(".") and "\n" not in text
    return text


def test_per_patient_audit_errors(run, bundle, plain):
    with pytest.raises(DataError) as err:  # a patient-level run needs the patients
        audit_membership(run, plain, shadows=2)
    assert "private per patient" in _one_sentence(err.value)
    leaky = DataBundle(bundle.train, _with_patients(plain.val, "p"), None, source="synthetic")
    with pytest.raises(DataError) as err:
        audit_membership(run, leaky, shadows=2)
    assert "also have training images" in _one_sentence(err.value)
    no_val_ids = DataBundle(bundle.train, plain.val, None, source="synthetic")
    with pytest.raises(DataError) as err:
        audit_membership(run, no_val_ids, shadows=2, unit="patient")
    assert "names no patients" in _one_sentence(err.value)
    with pytest.raises(ConfigError) as err:
        audit_membership(run, bundle, shadows=2, unit="person")
    assert "'person'" in _one_sentence(err.value)
    with pytest.raises(DataError) as err:
        one_run_audit(plain, model_name=MODEL, config=CONFIG, privacy=None, canaries=4,
                      unit="patient")
    assert "patient of every training image" in _one_sentence(err.value)
    with pytest.raises(ConfigError) as err:
        one_run_audit(bundle, model_name=MODEL, config=CONFIG, privacy=None, canaries=7)
    assert "training patients (6)" in _one_sentence(err.value)
