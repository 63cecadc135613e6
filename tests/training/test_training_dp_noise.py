"""fit()'s DP noise and Poisson sampling come from the CSPRNG, never from a torch generator:
the same seed gives different noise, no torch random draw happens during a DP fit, and
accounting, noise scale and batch splitting are those of Opacus."""

from __future__ import annotations

import math

import opacus.optimizers.optimizer as opacus_optimizer
import pytest
import torch
from one_step import one_step_update

from privmed.data import make_synthetic
from privmed.models import create_model
from privmed.privacy import PrivacyConfig
from privmed.training import TrainConfig, fit, plan_privacy


@pytest.fixture(scope="module")
def small():
    return make_synthetic(n_train=120, n_val=10, n_test=10, seed=2)


def test_same_seed_gives_different_noise_and_the_opacus_scale(small):
    sigma, clip = 2.0, 0.5
    noisy = PrivacyConfig(noise_multiplier=sigma, max_grad_norm=clip, delta=1e-3)
    first, second = one_step_update(small.train, noisy), one_step_update(small.train, noisy)
    assert not torch.equal(first, second)  # same seed, same data: fresh noise
    # Without noise (sigma ~ 0) the step is the clipped mean; what is left is the noise,
    # N(0, (sigma C)^2) per coordinate divided by the expected batch size, as in Opacus.
    clean = one_step_update(small.train, PrivacyConfig(noise_multiplier=1e-9, max_grad_norm=clip,
                                                delta=1e-3))
    noise = (first - clean) * len(small.train)
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.1)  # 1570 coordinates
    assert abs(noise.mean().item()) < 5 * sigma * clip / math.sqrt(noise.numel())
    # Plain training with the same seed stays exactly reproducible.
    assert torch.equal(one_step_update(small.train, None), one_step_update(small.train, None))


_TORCH_DRAWS = [(torch, "normal"), (torch, "randn"), (torch, "rand"), (torch, "randint"),
                (torch, "randperm"), (torch, "bernoulli"), (torch.Tensor, "normal_"),
                (torch.Tensor, "uniform_"), (torch.Tensor, "bernoulli_"),
                (opacus_optimizer, "_generate_noise")]


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_dp_fit_draws_nothing_from_torch_and_keeps_opacus_accounting(small, monkeypatch,
                                                                     mode):
    """Batch 2 of 120 (q = 1/60): about a third of the steps sample no image; physical
    batches of 1 make BatchMemoryManager split every larger one."""
    model = create_model("small-cnn", 1, 2, width=4)
    calls: list[str] = []

    def forbid(name):
        def draw(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"DP fit drew from torch's generator: {name}")
        return draw

    for owner, name in _TORCH_DRAWS:
        monkeypatch.setattr(owner, name, forbid(name))
    privacy = PrivacyConfig(noise_multiplier=1.0, delta=1e-3)
    cfg = TrainConfig(epochs=1, batch_size=2, physical_batch_size=1, grad_sample_mode=mode,
                      ema_decay=None, num_threads=1)
    result = fit(model, small.train, None, cfg, privacy)
    monkeypatch.undo()
    assert calls == []
    plan = plan_privacy(privacy, len(small.train), cfg)
    history = [(h["noise_multiplier"], h["sample_rate"], h["steps"])
               for h in result.privacy["history"]]
    assert history == plan.history == [(1.0, 1 / 60, 60)]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert math.isfinite(result.epochs[-1]["loss"])
