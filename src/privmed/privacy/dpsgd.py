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

Patient-level DP-SGD (``patients=`` given) is the same DP-SGD with the patient as the
record: the sampler Poisson-samples *patients* and yields all of each sampled patient's
images; the optimizer sums Opacus's per-image gradients per patient before clipping, so
each patient's contribution to a step has norm at most the clip norm C whatever their
image count, and the noise N(0, (σC)^2) with the accountant on the patient sample rate
gives (ε, δ) per patient. Physical batches (``physical_batch_size``) are cut between
patients, never through one, since Opacus clips each physical batch separately.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.batch_memory_manager import BatchSplittingSampler
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

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


class PatientPoissonSampler(SecurePoissonSampler):
    """Each *patient* joins a step's batch with probability ``sample_rate``, bringing all
    of their images (``members[p]``: the image indices of patient ``p``)."""

    def __init__(self, *, members: Sequence[np.ndarray], sample_rate: float, steps: int,
                 rng: SecureRandom) -> None:
        super().__init__(num_samples=len(members), sample_rate=sample_rate, steps=steps,
                         rng=rng)
        self.members = [np.asarray(m, dtype=np.int64) for m in members]

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            chosen = self.rng.bernoulli(self.num_samples, self.sample_rate).nonzero().view(-1)
            yield [int(i) for p in chosen.tolist() for i in self.members[p]]


def patient_members(patient_index: torch.Tensor | np.ndarray) -> list[np.ndarray]:
    """Image indices of each patient ``0 .. P-1`` (in image order) from one patient index
    per image."""
    index = np.asarray(patient_index)
    order = np.argsort(index, kind="stable")
    bounds = np.flatnonzero(np.diff(index[order])) + 1
    return np.split(order, bounds)


def poisson_loader(dataset: Dataset, sample_rate: float, steps: int,
                   rng: SecureRandom, members: Sequence[np.ndarray] | None = None
                   ) -> DataLoader:
    """A loader of ``steps`` Poisson batches of ``dataset`` per epoch (rate ``sample_rate``):
    of its records, or of patients when ``members`` lists each patient's records."""
    first = dataset[0]
    sampler = (SecurePoissonSampler(num_samples=len(dataset), sample_rate=sample_rate,
                                    steps=steps, rng=rng) if members is None else
               PatientPoissonSampler(members=members, sample_rate=sample_rate, steps=steps,
                                     rng=rng))
    return DataLoader(dataset, batch_sampler=sampler,
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


class PatientDPOptimizer(SecureDPOptimizer):
    """Clips per patient: Opacus's per-image gradients of a physical batch are summed per
    patient (``patient_index``, one entry per image, set before each ``step``) and the sums
    are what Opacus clips, accumulates and noises."""

    patient_index: torch.Tensor | None = None

    def clip_and_accumulate(self) -> None:
        index = self.patient_index
        if index is None:
            raise RuntimeError("Patient-level DP-SGD needs the batch's patient index before "
                               "each step.")
        if index.numel():
            _, inverse = torch.unique(index, return_inverse=True)
            n_patients = int(inverse.max()) + 1
            for p in self.params:
                per_image = self._get_flat_grad_sample(p)
                if per_image.shape[0] != index.numel():
                    raise RuntimeError("The patient index does not match the batch.")
                per_patient = per_image.new_zeros((n_patients, *per_image.shape[1:]))
                p.grad_sample = per_patient.index_add_(0, inverse.to(per_image.device),
                                                       per_image)
        self.patient_index = None  # one index per physical batch, never reused
        super().clip_and_accumulate()


class SecureDPOptimizerFastGradientClipping(_SecureNoise, DPOptimizerFastGradientClipping):
    pass


_SECURE: dict[type, type] = {DPOptimizer: SecureDPOptimizer,
                             DPOptimizerFastGradientClipping:
                                 SecureDPOptimizerFastGradientClipping}


def with_secure_noise(optimizer: DPOptimizer, rng: SecureRandom,
                      per_patient: bool = False) -> DPOptimizer:
    """``optimizer`` (as ``make_private`` built it) adding noise from ``rng`` from now on,
    and clipping per patient when ``per_patient``."""
    secure = _SECURE.get(type(optimizer))
    if per_patient:
        if type(optimizer) is not DPOptimizer:
            raise TypeError("Patient-level clipping needs per-image gradients (grad sample "
                            "mode 'hooks' or 'functorch').")
        secure = PatientDPOptimizer
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
                 rng: SecureRandom, patient_index: torch.Tensor | None = None
                 ) -> tuple[nn.Module, DPOptimizer, Any, DataLoader]:
    """``engine.make_private`` with Poisson sampling and noise from ``rng``: (model,
    optimizer, criterion, loader); the criterion is Opacus's wrapper under ghost clipping.

    ``patient_index`` (one int per record of ``dataset``, patients numbered ``0 .. P-1``):
    patient-level DP-SGD; the loader then yields ``(*record, patient_index)`` and the
    optimizer's ``patient_index`` must be set to each batch's before its step
    (:func:`patient_batches` does both)."""
    members = None
    if patient_index is not None:
        if grad_sample_mode == "ghost":
            raise ValueError("Ghost clipping computes per-image norms without per-image "
                             "gradients, so it cannot clip per patient; use grad sample "
                             "mode 'hooks' or 'functorch'.")
        members = patient_members(patient_index)
        dataset = TensorDataset(*dataset.tensors, patient_index)
    loader = poisson_loader(dataset, sample_rate, steps_per_epoch, rng, members)
    prepared = engine.make_private(
        module=module, optimizer=optimizer, data_loader=loader, criterion=criterion,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        poisson_sampling=False,  # the loader already samples; Opacus would redo it with MT
        grad_sample_mode=grad_sample_mode)
    model, dp_optimizer, loader = prepared[0], prepared[1], prepared[-1]
    if grad_sample_mode == "ghost":
        criterion = prepared[2]
    model.forbid_grad_accumulation()  # what poisson_sampling=True does: one batch per step
    dp_optimizer = with_secure_noise(dp_optimizer, rng, per_patient=members is not None)
    if members is not None:
        # Opacus averages the noisy sum over the expected batch: here, expected patients.
        dp_optimizer.expected_batch_size = max(1, round(sample_rate * len(members)))
    return model, dp_optimizer, criterion, loader


class _PatientSplittingSampler(BatchSplittingSampler):
    """Opacus's physical-batch splitter, cutting only between patients (a patient larger
    than the physical batch is one physical batch of its own)."""

    def __init__(self, *, sampler: Any, max_batch_size: int, optimizer: DPOptimizer,
                 patient_of: np.ndarray) -> None:
        super().__init__(sampler=sampler, max_batch_size=max_batch_size, optimizer=optimizer)
        self.patient_of = patient_of

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            chunks: list[list[int]] = [[]]
            for run in self._patient_runs(batch):  # the sampler yields a patient's images together
                if chunks[-1] and len(chunks[-1]) + len(run) > self.max_batch_size:
                    chunks.append([])
                chunks[-1].extend(run)
            for chunk in chunks[:-1]:
                self.optimizer.signal_skip_step(do_skip=True)
                yield chunk
            self.optimizer.signal_skip_step(do_skip=False)
            yield chunks[-1]

    def _patient_runs(self, batch: list[int]) -> Iterator[list[int]]:
        run: list[int] = []
        for i in batch:
            if run and self.patient_of[i] != self.patient_of[run[-1]]:
                yield run
                run = []
            run.append(i)
        if run:
            yield run

    def __len__(self) -> int:
        return len(self.sampler)


def patient_batches(loader: DataLoader, optimizer: DPOptimizer,
                    max_physical_batch_size: int | None) -> Iterator[tuple[torch.Tensor, ...]]:
    """``(images, labels)`` of each physical batch of a patient-level ``loader``, the
    optimizer told the batch's patients first; physical batches hold whole patients."""
    patient_of = loader.dataset.tensors[-1].numpy()
    if max_physical_batch_size is not None:
        loader = DataLoader(loader.dataset, collate_fn=loader.collate_fn,
                            batch_sampler=_PatientSplittingSampler(
                                sampler=loader.batch_sampler, optimizer=optimizer,
                                max_batch_size=max_physical_batch_size,
                                patient_of=patient_of))
    for *record, patients in loader:
        optimizer.patient_index = patients
        yield tuple(record)


