"""fit(): DP-SGD mechanics, accounting, ledger and resume, on real Opacus."""

from __future__ import annotations

import copy

import pytest
import torch
from one_step import one_step_update
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn

from privmed.data import make_synthetic
from privmed.data.dataset import ImageDataset
from privmed.errors import BudgetExceededError, ConfigError
from privmed.models import create_model, load_user_model
from privmed.privacy import BudgetLedger, PrivacyConfig
from privmed.training import TrainConfig, fit


@pytest.fixture(scope="module")
def small():
    return make_synthetic(n_train=240, n_val=80, n_test=80, seed=1)


def test_per_sample_clipping_bounds_one_sample_contribution(small):
    """Neighbouring datasets (one image and label replaced) move the weights by
    at most lr * 2C / B under DP; without DP the difference is far larger."""
    d = small.train.subset(range(64))
    images, labels = d.images.clone(), d.labels.clone()
    images[5] = 1.0 - images[5]
    labels[5] = 1 - labels[5]
    neighbour = ImageDataset(images, labels, d.class_names)
    clip = 0.5
    privacy = PrivacyConfig(noise_multiplier=1e-6, max_grad_norm=clip, delta=1e-3)
    diff = (one_step_update(d, privacy) - one_step_update(neighbour, privacy)).norm()
    bound = 1.0 * 2 * clip / len(d)
    assert diff <= bound * (1 + 1e-3)
    assert diff > 0  # the changed sample did contribute
    plain = (one_step_update(d, None) - one_step_update(neighbour, None)).norm()
    assert plain > 100 * bound


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_reported_epsilon_matches_opacus_and_hits_target(small, accountant):
    model = create_model("small-cnn", 1, 2, width=8)
    privacy = PrivacyConfig(target_epsilon=2.0, delta=1e-4, accountant=accountant)
    cfg = TrainConfig(epochs=2, batch_size=60, seed=0)
    result = fit(model, small.train, small.val, cfg, privacy)
    p = result.privacy
    hist = [(h["noise_multiplier"], h["sample_rate"], h["steps"]) for h in p["history"]]
    assert sum(h[2] for h in hist) == 2 * 4  # 240 / 60 = 4 steps per epoch
    reference = PRVAccountant() if accountant == "prv" else RDPAccountant()
    reference.history = hist
    # PRV estimates carry an error bar (Opacus's default eps_error is 0.01); RDP is exact.
    tolerance = {"abs": 0.011} if accountant == "prv" else {"rel": 1e-6}
    assert p["epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-4), **tolerance)
    assert 0.99 * 2.0 <= p["epsilon"] <= 2.0
    assert result.epochs[-1]["epsilon"] == pytest.approx(p["epsilon"], rel=1e-6)


@pytest.mark.slow  # in-process, but long: make test-fast leaves it out
def test_plain_training_learns_synthetic():
    bundle = make_synthetic(n_train=1200, n_val=300, n_test=50, seed=2)
    model = create_model("small-cnn", 1, 2)
    config = TrainConfig(epochs=6, batch_size=64, lr=2e-3)
    result = fit(model, bundle.train, bundle.val, config, None)
    assert result.privacy["enabled"] is False and result.privacy["epsilon"] is None
    assert result.metrics["val"]["roc_auc"] > 0.75  # chance is 0.5
    assert result.epochs[-1]["loss"] < result.epochs[0]["loss"]


def test_ledger_refuses_overspend_before_any_step(small, tmp_path):
    ledger = BudgetLedger(tmp_path / "ledger.sqlite")
    ledger.set_budget(small.train.dataset_id, 1.0, 1e-4)
    model = create_model("small-cnn", 1, 2, width=8)
    before = copy.deepcopy(model.state_dict())
    cfg = TrainConfig(epochs=2, batch_size=60, checkpoint_dir=tmp_path / "run")
    with pytest.raises(BudgetExceededError, match="budget"):
        fit(model, small.train, small.val, cfg,
            PrivacyConfig(target_epsilon=3.0, delta=1e-4), ledger=ledger)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert ledger.entries() == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Crash(Exception):
    pass


def _crash_after_first(record: dict) -> None:
    if record["epoch"] == 1:
        raise _Crash


def test_resume_continues_same_accountant_and_charges_once(small, tmp_path):
    privacy = PrivacyConfig(target_epsilon=2.0, delta=1e-4)
    ledger = BudgetLedger(tmp_path / "ledger.sqlite")
    ledger.set_budget(small.train.dataset_id, 5.0, 1e-4)
    run = tmp_path / "run"
    cfg = TrainConfig(epochs=3, batch_size=60, checkpoint_dir=run, seed=4)
    torch.manual_seed(0)
    with pytest.raises(_Crash):
        fit(create_model("small-cnn", 1, 2, width=8), small.train, small.val, cfg, privacy,
            ledger=ledger, run_id="r1", on_epoch=_crash_after_first)
    # The checkpoint holds no sampler or noise state (a resumed DP run draws a fresh key).
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["shuffle"] is None and "generator" not in saved
    cfg_resume = TrainConfig(epochs=3, batch_size=60, checkpoint_dir=run, seed=4, resume=True)
    torch.manual_seed(0)
    resumed = fit(create_model("small-cnn", 1, 2, width=8), small.train, small.val, cfg_resume,
                  privacy, ledger=ledger, run_id="ignored-on-resume")
    assert resumed.run_id == "r1"
    assert sum(h["steps"] for h in resumed.privacy["history"]) == 3 * 4
    assert [r["epoch"] for r in resumed.epochs] == [1, 2, 3]

    torch.manual_seed(0)
    straight = fit(create_model("small-cnn", 1, 2, width=8), small.train, small.val,
                   TrainConfig(epochs=3, batch_size=60, seed=4), privacy)
    assert resumed.privacy["epsilon"] == pytest.approx(straight.privacy["epsilon"], rel=1e-9)
    assert resumed.privacy["history"] == straight.privacy["history"]
    entries = ledger.entries(small.train.dataset_id)
    assert len(entries) == 1 and entries[0]["status"] == "committed"
    assert ledger.spent(small.train.dataset_id) == pytest.approx(
        straight.privacy["epsilon"], rel=1e-3)


def test_plain_resume_continues_exactly(small, tmp_path):
    """Without DP the seeded shuffle's state is checkpointed: resuming gives the same model."""
    run = tmp_path / "run"
    cfg = dict(epochs=3, batch_size=60, seed=4, ema_decay=None, num_threads=1)
    torch.manual_seed(0)
    with pytest.raises(_Crash):
        fit(create_model("small-cnn", 1, 2, width=8), small.train, None,
            TrainConfig(**cfg, checkpoint_dir=run), None, on_epoch=_crash_after_first)
    torch.manual_seed(0)
    resumed = fit(create_model("small-cnn", 1, 2, width=8), small.train, None,
                  TrainConfig(**cfg, checkpoint_dir=run, resume=True), None)
    torch.manual_seed(0)
    straight = fit(create_model("small-cnn", 1, 2, width=8), small.train, None,
                   TrainConfig(**cfg), None)
    for a, b in zip(resumed.model.parameters(), straight.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_resume_without_checkpoint_is_a_clear_error(small, tmp_path):
    cfg = TrainConfig(epochs=1, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ConfigError, match="Nothing to resume"):
        fit(create_model("small-cnn", 1, 2, width=8), small.train, None, cfg, None)


def test_model_with_wrong_output_size_is_refused(small):
    model = create_model("small-cnn", 1, 5, width=8)
    with pytest.raises(ConfigError, match="5"):
        fit(model, small.train, None, TrainConfig(epochs=1), None)


def test_user_batchnorm_model_is_converted_and_trains(small, tmp_path):
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    path = tmp_path / "user.pt"
    torch.save(net, path)
    model, notes = load_user_model(path)
    assert any("BatchNorm" in n for n in notes)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    result = fit(model, small.train, small.val, TrainConfig(epochs=1, batch_size=60),
                 PrivacyConfig(target_epsilon=5.0, delta=1e-4))
    assert result.privacy["epsilon"] <= 5.0
