"""Opacus's DP-SGD with its randomness, Poisson sampling and noise, from :class:`SecureRandom`.

Opacus draws both from a torch Generator (a Mersenne Twister with a 32-bit effective seed);
its ``secure_mode`` needs torchcsprng, which has no builds for current torch. So
:func:`make_private` keeps everything else of ``PrivacyEngine.make_private`` (per-sample
gradients, clipping, accountant hook, ghost clipping) and replaces exactly those two draws:

* the data loader's batch sampler Poisson-samples from the CSPRNG; ``len`` is the planned
  steps per epoch, so Opacus's accountant rate ``1 / len(loader)`` is the planned ``q``;
  empty batches are collated as Opacus's ``DPDataLoader`` does;
* the optimizer's ``add_noise`` (``DPOptimizer`` for hooks / functorch,
  ``DPOptimizerFastGradientClipping`` for ghost clipping) draws the noise of all
  parameters in one CSPRNG call, with the same standard deviation as Opacus's.
"""

from __future__ import annotations

from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from privmed.privacy.noise import SecureRandom


class SecurePoissonSampler(UniformWithReplacementSampler):
    """Opacus's Poisson sampler (each record joins a step's batch with probability
    ``sample_rate``) drawing from a :class:`SecureRandom`. A subclass, so that Opacus's
    BatchMemoryManager splits its batches as it splits those of its own sampler."""

    def __init__(self, *, num_samples: int, sample_rate: float, steps: int,
                 rng: SecureRandom) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, steps=steps)
        self.rng = rng

    def __iter__(self):
        for _ in range(self.steps):
            yield self.rng.bernoulli(self.num_samples, self.sample_rate).nonzero().view(-1).tolist()


def poisson_loader(dataset: Dataset, sample_rate: float, steps: int,
                   rng: SecureRandom) -> DataLoader:
    """A loader of ``steps`` Poisson batches of ``dataset`` per epoch (rate ``sample_rate``)."""
    first = dataset[0]
    return DataLoader(dataset, batch_sampler=SecurePoissonSampler(
        num_samples=len(dataset), sample_rate=sample_rate, steps=steps, rng=rng),
        collate_fn=wrap_collate_with_empty(
            collate_fn=default_collate, sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
            dtypes=[dtype_safe(x) for x in first]))


class _SecureNoise:
    """``add_noise`` of Opacus's flat-clipping optimizers, noise from ``self.noise_rng``."""

    noise_rng: SecureRandom

    def add_noise(self) -> None:
        # As DPOptimizerFastGradientClipping: an adaptive-clipping multiplier when one is set.
        multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        params = self.params
        for p in params:
            _check_processed_flag(p.summed_grad)
        ref = params[0].summed_grad
        # One CSPRNG call for the whole model: chunked keystream, not one call per tensor.
        noise = self.noise_rng.gaussian(sum(p.summed_grad.numel() for p in params),
                                        multiplier * self.max_grad_norm, device=ref.device,
                                        dtype=ref.dtype)
        pieces = noise.split([p.summed_grad.numel() for p in params])
        for p, piece in zip(params, pieces, strict=True):
            piece = piece.to(p.summed_grad.device, p.summed_grad.dtype)
            p.grad = (p.summed_grad + piece.view_as(p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)


class SecureDPOptimizer(_SecureNoise, DPOptimizer):
    pass


class SecureDPOptimizerFastGradientClipping(_SecureNoise, DPOptimizerFastGradientClipping):
    pass


_SECURE: dict[type, type] = {DPOptimizer: SecureDPOptimizer,
                             DPOptimizerFastGradientClipping:
                                 SecureDPOptimizerFastGradientClipping}


def with_secure_noise(optimizer: DPOptimizer, rng: SecureRandom) -> DPOptimizer:
    """``optimizer`` (as ``make_private`` built it) adding noise from ``rng`` from now on."""
    secure = _SECURE.get(type(optimizer))
    if secure is None:
        raise TypeError(f"privmed has no CSPRNG noise for Opacus's {type(optimizer).__name__}.")
    # make_private builds the optimizer itself; the subclass differs only in add_noise, so
    # swapping the class of the built object is the narrowest hook.
    optimizer.__class__ = secure
    optimizer.noise_rng = rng
    optimizer.generator = None  # nothing may fall back to a torch generator
    return optimizer


def make_private(engine: PrivacyEngine, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                 criterion: Any, dataset: Dataset, sample_rate: float, steps_per_epoch: int,
                 noise_multiplier: float, max_grad_norm: float, grad_sample_mode: str,
                 rng: SecureRandom) -> tuple[nn.Module, DPOptimizer, Any, DataLoader]:
    """``engine.make_private`` with Poisson sampling and noise from ``rng``: (model,
    optimizer, criterion, loader); the criterion is Opacus's wrapper under ghost clipping."""
    loader = poisson_loader(dataset, sample_rate, steps_per_epoch, rng)
    prepared = engine.make_private(
        module=module, optimizer=optimizer, data_loader=loader, criterion=criterion,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        poisson_sampling=False,  # the loader already samples; Opacus would redo it with MT
        grad_sample_mode=grad_sample_mode)
    model, dp_optimizer, loader = prepared[0], prepared[1], prepared[-1]
    if grad_sample_mode == "ghost":
        criterion = prepared[2]
    model.forbid_grad_accumulation()  # what poisson_sampling=True does: one batch per step
    return model, with_secure_noise(dp_optimizer, rng), criterion, loader
