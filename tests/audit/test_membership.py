"""Membership inference on small synthetic runs: LiRA beats chance on an overfit model and
never claims more than the DP guarantee; the one-run audit; clear errors.

Models are ScatterNet linear heads (scattering computed once per dataset): a full audit
with 8 shadow models takes seconds on one CPU thread.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from privmed.audit.epsilon import roc_metrics
from privmed.audit.membership import (
    assign_shadows,
    audit_membership,
    lira_offline,
    lira_online,
    loss_scores,
    one_run_audit,
    scaled_logits,
)
from privmed.data import make_synthetic
from privmed.errors import ConfigError, DataError, PrivmedError
from privmed.privacy import PrivacyConfig
from privmed.training import TrainConfig
from privmed.training.run import train_run

MODEL = "scatter-linear"


def _config(lr: float) -> TrainConfig:
    # One thread: on small models, thread synchronisation costs more than it saves.
    return TrainConfig(epochs=30, batch_size=32, physical_batch_size=32, lr=lr, ema_decay=None,
                       lr_schedule="constant", num_threads=1)


@pytest.fixture(scope="module")
def bundle():
    return make_synthetic(n_train=150, n_val=150, n_test=40, seed=3)


def _train(bundle, path, privacy):
    torch.manual_seed(0)  # train_run builds the model before fit() seeds
    train_run(bundle, path, model_name=MODEL, config=_config(0.05 if privacy else 0.01),
              privacy=privacy, progress=False, say=lambda _: None)
    return path


@pytest.fixture(scope="module")
def plain_run(bundle, tmp_path_factory):
    """No DP, 30 epochs on 150 images, more features than images: memorises."""
    return _train(bundle, tmp_path_factory.mktemp("audit") / "plain", None)


@pytest.fixture(scope="module")
def dp_run(bundle, tmp_path_factory):
    return _train(bundle, tmp_path_factory.mktemp("audit") / "dp",
                  PrivacyConfig(target_epsilon=1.0))


def _one_sentence(error: Exception) -> str:
    text = str(error)
    assert text.endswith((".", "?")) and "\n" not in text and "Traceback" not in text
    return text


# ----------------------------------------------------------------------------- scores

def test_scaled_logit_and_loss_match_their_definitions():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 5, (50, 4))
    labels = rng.integers(0, 4, 50)
    p = torch.softmax(torch.as_tensor(logits), 1).numpy()
    p_y = p[np.arange(50), labels]
    assert scaled_logits(logits, labels) == pytest.approx(np.log(p_y) - np.log(1 - p_y))
    ce = torch.nn.functional.cross_entropy(torch.as_tensor(logits), torch.as_tensor(labels),
                                           reduction="none").numpy()
    assert loss_scores(logits, labels) == pytest.approx(-ce)
    # Stable where probabilities saturate: finite and ordered.
    phi = scaled_logits(np.array([[800.0, 0.0], [0.0, 800.0]]), np.array([0, 0]))
    assert phi.tolist() == [800.0, -800.0]


def test_shadow_assignment_is_balanced():
    keep = assign_shadows(1000, 8, np.random.default_rng(0))
    assert keep.shape == (8, 1000)
    assert (keep.sum(axis=0) == 4).all()  # every example IN for exactly half the shadows
    assert (np.abs(keep.sum(axis=1) - 500) < 80).all()  # every shadow sees about half


@pytest.mark.parametrize("shadows, pooled", [(8, True), (64, False)])
def test_lira_separates_simulated_members(shadows, pooled):
    """Shadow scores: per-example difficulty + 1.5 when IN + noise. A target score drawn
    the same way is classified by LiRA; difficulty differences hide it from a global
    threshold (what LiRA's per-example calibration is for)."""
    rng = np.random.default_rng(1)
    n = 2000
    difficulty = rng.normal(0, 3, n)
    keep = assign_shadows(n, shadows, rng)
    shadow_phi = difficulty + 1.5 * keep + rng.normal(0, 0.5, (shadows, n))
    member = rng.random(n) < 0.5
    target = difficulty + 1.5 * member + rng.normal(0, 0.5, n)
    global_auc = roc_metrics(target[member], target[~member])["auc"]
    for attack in (lira_online, lira_offline):
        scores = attack(target, shadow_phi, keep, global_variance=pooled)
        auc = roc_metrics(scores[member], scores[~member])["auc"]
        assert auc > 0.9 > global_auc + 0.15


# ----------------------------------------------------------------------------- full audits

@pytest.mark.slow  # in-process, but long: make test-fast leaves it out
def test_lira_clearly_beats_chance_on_an_overfit_model(plain_run, bundle):
    calls = []
    audit = audit_membership(plain_run, bundle, shadows=8,
                             progress=lambda done, total: calls.append((done, total)))
    json.dumps(audit, allow_nan=False)
    m = audit["membership"]
    assert m["attack"] == "lira-online" and m["shadows"] == 8
    assert m["examples"] == 300 and m["members"] == m["nonmembers"] == 150
    assert calls[0] == (0, 8) and calls[-1] == (8, 8)
    lira = m["lira"]
    assert lira["auc"] > 0.75
    assert lira["tpr_at_fpr_0.01"] > 0.05  # > 5x chance at 1 % FPR
    assert m["lira_offline"]["auc"] > 0.75
    assert lira["auc"] > m["loss"]["auc"] > 0.55  # LiRA beats the LOSS baseline
    assert len(lira["fpr"]) <= 200 and lira["fpr"][-1] == 1.0
    assert m["eps_lb"] > 0.5  # a non-private model leaks measurably
    assert m["claimed_epsilon"] is None and m["consistent"] is True
    assert m["shadow_training"]["noise_multiplier"] is None


@pytest.mark.slow  # in-process, but long: make test-fast leaves it out
def test_dp_model_bound_never_exceeds_the_claimed_epsilon(dp_run, bundle):
    audit = audit_membership(dp_run, bundle, shadows=4)
    json.dumps(audit, allow_nan=False)
    m = audit["membership"]
    results = json.loads((dp_run / "results.json").read_text())
    claimed, delta = results["privacy"]["epsilon"], results["privacy"]["delta"]
    assert claimed == pytest.approx(1.0, abs=0.05)
    assert m["claimed_epsilon"] == claimed and m["delta"] == delta
    # The shadows use the target's recipe: same noise multiplier, same sampling.
    assert m["shadow_training"]["noise_multiplier"] == results["privacy"]["noise_multiplier"]
    assert m["shadow_training"]["batch_size"] == 32
    assert m["eps_lb"] <= claimed and m["consistent"] is True
    for attack in ("lira", "lira_offline", "loss"):
        bound = m[attack]["epsilon"]
        assert bound["eps_lb"] <= claimed
        tpr_lo, fpr_hi = bound["intervals"]["tpr"][0], bound["intervals"]["fpr"][1]
        assert tpr_lo <= math.exp(claimed) * fpr_hi + delta
        assert 1 - fpr_hi <= math.exp(claimed) * (1 - tpr_lo) + delta
        assert m[attack]["auc"] < 0.7


def test_offline_audit_on_a_bounded_sample(plain_run, bundle):
    m = audit_membership(plain_run, bundle, shadows=2, online=False, max_examples=80,
                         seed=1)["membership"]
    assert m["attack"] == "lira-offline" and "lira_offline" not in m
    assert m["examples"] == 80 and m["members"] == 40
    assert m["shadow_training"]["train_size"] == 40
    # Sampling rate kept: 32 of the target's 150 -> about 9 of 40.
    assert m["shadow_training"]["batch_size"] == round(32 * 40 / 150)


@pytest.mark.slow  # in-process, but long: make test-fast leaves it out
def test_one_run_audit_detects_memorisation_and_respects_dp(bundle):
    data = make_synthetic(n_train=300, n_val=0, n_test=0, seed=5)
    plain = one_run_audit(data, model_name=MODEL, config=_config(0.01), privacy=None,
                          canaries=100)["one_run"]
    assert plain["guesses"] == 50 and plain["correct"] >= 45
    assert plain["eps_lb"] > 1.5 and plain["claimed_epsilon"] is None
    private = one_run_audit(data, model_name=MODEL, config=_config(0.05),
                            privacy=PrivacyConfig(target_epsilon=1.0), canaries=100)["one_run"]
    json.dumps(private, allow_nan=False)
    assert private["claimed_epsilon"] == pytest.approx(1.0, abs=0.05)
    assert private["eps_lb"] <= private["claimed_epsilon"] and private["consistent"]
    assert 0 < private["delta"] < 1 / 300


# ----------------------------------------------------------------------------- errors

def test_run_dir_without_results_is_a_data_error(tmp_path, bundle):
    with pytest.raises(DataError) as err:
        audit_membership(tmp_path, bundle)
    assert "results" in _one_sentence(err.value)


def test_data_of_another_shape_is_a_data_error(plain_run, bundle):
    other = make_synthetic(n_train=150, n_val=150, n_test=40, seed=3, size=16)
    with pytest.raises(DataError) as err:
        audit_membership(plain_run, other)
    assert "(1, 16, 16)" in _one_sentence(err.value)


def test_other_training_data_or_no_held_out_split_is_refused(plain_run, bundle, tmp_path):
    other = make_synthetic(n_train=150, n_val=150, n_test=40, seed=4)
    with pytest.raises(DataError) as err:
        audit_membership(plain_run, other)
    assert "not the one the run" in _one_sentence(err.value)
    no_held_out = type(bundle)(bundle.train, None, None, source="synthetic")
    with pytest.raises(DataError) as err:
        audit_membership(plain_run, no_held_out)
    _one_sentence(err.value)
    with pytest.raises(ConfigError) as err:
        audit_membership(plain_run, bundle, shadows=1, online=True)
    _one_sentence(err.value)
    broken = tmp_path / "broken"
    shutil.copytree(plain_run, broken)
    (broken / "model.pt").unlink()
    with pytest.raises(PrivmedError) as err:
        audit_membership(broken, bundle)
    _one_sentence(err.value)
