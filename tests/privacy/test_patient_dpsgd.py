"""Patient-level DP-SGD: a patient's whole contribution to a step is clipped to C whatever
their image count, patients are sampled whole at the patient rate, and the accountant runs
on that rate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from one_step import one_step_update

from privmed.data import make_synthetic
from privmed.data.dataset import ImageDataset
from privmed.errors import ConfigError
from privmed.models import create_model
from privmed.privacy import PrivacyConfig, SecureRandom, compute_epsilon
from privmed.privacy.dpsgd import PatientPoissonSampler, patient_members
from privmed.training import TrainConfig, fit, plan_privacy

CLIP = 0.5
NO_NOISE = dict(noise_multiplier=1e-9, max_grad_norm=CLIP, delta=1e-3)


def _patients(images: list[torch.Tensor], labels: list[int], ids: list[str]) -> ImageDataset:
    return ImageDataset(torch.stack(images), torch.tensor(labels), ("normal", "pneumonia"),
                        "patients", tuple(ids))


def _noisy_sum(data: ImageDataset, unit: str, expected_units: int) -> torch.Tensor:
    """The clipped gradient sum of one full-batch step (noise ~0): the update times the
    expected batch (patients or images) Opacus divides by."""
    return one_step_update(data, PrivacyConfig(**NO_NOISE, unit=unit)) * expected_units


@pytest.mark.parametrize("n_images", [1, 20])
def test_a_patients_contribution_is_clipped_to_c_whatever_their_image_count(n_images):
    gen = torch.Generator().manual_seed(5)
    many = torch.rand(1, 1, 8, 8, generator=gen).repeat(n_images, 1, 1, 1)  # one patient
    other = torch.rand(1, 1, 8, 8, generator=gen)
    both = _patients([*many, other[0]], [0] * n_images + [1], ["a"] * n_images + ["b"])
    alone = _patients([other[0]], [1], ["b"])
    # What patient "a" adds to the clipped sum: at most C at patient level...
    added = _noisy_sum(both, "patient", 2) - _noisy_sum(alone, "patient", 1)
    assert added.norm().item() <= CLIP * (1 + 1e-3)
    assert added.norm().item() >= 0.9 * CLIP  # its gradient is far above C: clipped, not lost
    # ...while per image each of its n images adds up to C (the same images, aligned).
    per_image = _noisy_sum(both, "image", n_images + 1) - _noisy_sum(alone, "image", 1)
    assert per_image.norm().item() == pytest.approx(n_images * CLIP, rel=0.01)


def test_the_sampler_takes_whole_patients_at_the_patient_rate():
    index = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    members = patient_members(index)
    assert [m.tolist() for m in members] == [[0, 1, 2], [3], [4, 5], [6, 7, 8, 9]]
    q, steps = 0.25, 4000
    sampler = PatientPoissonSampler(members=members, sample_rate=q, steps=steps,
                                    rng=SecureRandom())
    seen = np.zeros(4)
    for batch in sampler:
        patients = index[batch].tolist()
        for p in set(patients):  # every image of a sampled patient, each once
            assert sorted(i for i in batch if index[i] == p) == members[p].tolist()
        seen[list(set(patients))] += 1
    # Each patient is in a step with probability q (binomial, 5 standard deviations).
    assert np.all(np.abs(seen / steps - q) < 5 * math.sqrt(q * (1 - q) / steps))


def _with_patients(data: ImageDataset, per_patient: int = 3) -> ImageDataset:
    ids = tuple(f"p{i // per_patient}" for i in range(len(data)))
    return ImageDataset(data.images, data.labels, data.class_names, data.name, ids)


def test_epsilon_is_the_accountants_on_the_patient_sample_rate():
    bundle = make_synthetic(n_train=240, n_val=30, n_test=10, seed=4)
    train = _with_patients(bundle.train)
    cfg = TrainConfig(epochs=2, batch_size=48, physical_batch_size=16, seed=1, num_threads=1)
    result = fit(create_model("small-cnn", 1, 2), train, bundle.val, cfg,
                 PrivacyConfig(target_epsilon=2.0, unit="patient"))
    p = result.privacy
    assert (p["unit"], p["units"]) == ("patient", 80)
    assert p["delta"] < 1 / 80  # δ against patients, not images
    q = p["sample_rate"]
    assert q == pytest.approx(1 / math.ceil(240 / 48))
    steps = sum(h["steps"] for h in p["history"])
    assert steps == 2 * math.ceil(240 / 48)
    assert all(h["sample_rate"] == q for h in p["history"])
    assert p["epsilon"] == pytest.approx(compute_epsilon([(p["noise_multiplier"], q, steps)],
                                                         p["delta"], "prv"))
    assert p["epsilon"] == pytest.approx(2.0, abs=0.05)
    # The same data per image: more records, a smaller δ and the same q.
    plan = plan_privacy(PrivacyConfig(target_epsilon=2.0, unit="image"), train, cfg)
    assert (plan.unit, plan.units, plan.sample_rate) == ("image", 240, q)


def test_patient_level_is_the_default_when_patients_are_known_and_refused_without_them():
    bundle = make_synthetic(n_train=60, n_val=10, n_test=10, seed=4)
    cfg = TrainConfig(epochs=1, batch_size=30)
    assert plan_privacy(PrivacyConfig(), _with_patients(bundle.train), cfg).unit == "patient"
    assert plan_privacy(PrivacyConfig(), bundle.train, cfg).unit == "image"
    with pytest.raises(ConfigError, match="patient of every training image"):
        plan_privacy(PrivacyConfig(unit="patient"), bundle.train, cfg)
    ghost = TrainConfig(epochs=1, batch_size=30, grad_sample_mode="ghost")
    with pytest.raises(ConfigError, match="cannot clip per patient"):
        fit(create_model("small-cnn", 1, 2), _with_patients(bundle.train), None, ghost,
            PrivacyConfig(unit="patient"))


def test_physical_batches_are_cut_between_patients_never_through_one():
    from privmed.privacy.dpsgd import _PatientSplittingSampler

    class Signals:
        def __init__(self) -> None:
            self.skips: list[bool] = []

        def signal_skip_step(self, do_skip: bool) -> None:
            self.skips.append(do_skip)

    patient_of = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 3, 3, 4])
    logical = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [], [3, 12]]
    signals = Signals()
    chunks = list(_PatientSplittingSampler(sampler=logical, max_batch_size=4,
                                           optimizer=signals, patient_of=patient_of))
    assert chunks == [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11], [12], [], [3, 12]]
    # Only the last physical batch of a logical batch lets the optimizer step.
    assert signals.skips == [True, True, True, False, False, False]
