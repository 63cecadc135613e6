"""``fit()``: the one training function, central or inside a federated node.

Plain training or DP-SGD through Opacus (Poisson sampling, per-sample
clipping, Gaussian noise, PRV/RDP accounting), its sampling and noise drawn
from :class:`privmed.privacy.SecureRandom`. Knows nothing about networks or
files beyond its optional checkpoint directory and budget ledger.
"""

from __future__ import annotations

import copy
import functools
import math
import time
import uuid
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

from privmed.data.dataset import ImageDataset
from privmed.errors import ConfigError
from privmed.privacy import (
    BudgetLedger,
    PrivacyConfig,
    SecureRandom,
    calibrate_noise_multiplier,
    compute_epsilon,
    epsilon_curve,
    history_to_json,
)
from privmed.privacy.dpsgd import make_private, patient_batches
from privmed.privacy.records import PrivacyRecords, protected_units, resolve_unit
from privmed.training.checkpoint import load_checkpoint, save_checkpoint
from privmed.training.config import TrainConfig
from privmed.training.features import fixed_feature_dataset
from privmed.training.metrics import evaluate
from privmed.training.progress import TrainingProgress
from privmed.training.run_folder import no_privacy

History = list[tuple[float, float, int]]


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained (unwrapped) model and its record."""

    model: nn.Module
    metrics: dict[str, dict]
    epochs: list[dict]
    privacy: dict[str, Any]
    config: TrainConfig
    run_id: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def epsilon(self) -> float | None:
        return self.privacy.get("epsilon")

    @property
    def delta(self) -> float | None:
        """δ of the (ε, δ) guarantee; None without DP, like :attr:`epsilon`."""
        return self.privacy.get("delta")


@dataclass
class DPPlan:
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    steps_per_epoch: int
    #: What (ε, δ) protects: "patient" or "image"; ``units`` of them in training.
    unit: str = "image"
    units: int = 0
    #: Releases planned on the same data before these steps (a federation's statistics).
    prefix: tuple[tuple[float, float, int], ...] = ()

    @property
    def history(self) -> History:
        return [*self.prefix, (self.noise_multiplier, self.sample_rate, self.steps)]


@functools.lru_cache(maxsize=256)
def _calibrate(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
               prefix: tuple[tuple[float, float, int], ...]) -> float:
    # Seconds per call, and deterministic: a federation's sites of one size share one.
    return calibrate_noise_multiplier(epsilon, delta, sample_rate, steps, accountant, prefix)


def plan_privacy(privacy: PrivacyConfig, train: ImageDataset | int, config: TrainConfig, *,
                 sample_rate: float | None = None, steps: int | None = None,
                 prefix: History = ()) -> DPPlan:
    """Unit, sample rate, planned steps, delta and noise multiplier for a DP run: the one
    planner of central training and of every federated node.

    Per patient (whenever ``train`` names its patients, unless ``privacy.unit`` says
    'image'), patients are Poisson-sampled at the rate q = 1 / ceil(N_images / batch): the
    expected batch is still ``batch_size`` images, and δ is below 1 / N_patients.
    ``sample_rate`` / ``steps`` replace that rate and ``config.epochs`` epochs of steps (a
    distributed-DP node: one step of rate B / N per round); ``prefix``: releases planned
    on the same data before these steps, counted when the noise is calibrated."""
    if isinstance(train, int):  # a count of images whose patients are unknown
        n_train, unit, units = train, resolve_unit(privacy.unit, False), train
    else:
        n_train, (unit, units) = len(train), protected_units(privacy.unit, train)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    if sample_rate is None:
        sample_rate = 1.0 / steps_per_epoch  # what Opacus's accountant will use: 1 / len(loader)
    if steps is None:
        steps = steps_per_epoch * config.epochs
    delta = privacy.resolved_delta(units, unit)
    prefix = tuple((float(s), float(q), int(k)) for s, q, k in prefix)
    sigma = privacy.noise_multiplier
    if sigma is None:
        sigma = _calibrate(privacy.target_epsilon, delta, sample_rate, steps,
                           privacy.accountant, prefix)
    return DPPlan(float(sigma), sample_rate, steps, delta, steps_per_epoch, unit, units, prefix)


def fit(
    model: nn.Module,
    train: ImageDataset,
    val: ImageDataset | None = None,
    config: TrainConfig | None = None,
    privacy: PrivacyConfig | None = None,
    *,
    ledger: BudgetLedger | None = None,
    run_id: str | None = None,
    progress: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``train``; DP-SGD when ``privacy`` is given.

    With a ``ledger``, the planned spend is reserved against the training
    set's budget before the first step (refused with BudgetExceededError if
    it does not fit) and the actual spend is recorded after every epoch.
    With ``config.checkpoint_dir`` a checkpoint is written after every epoch;
    ``config.resume`` continues from it with the same accountant history.
    """
    config = config or TrainConfig()
    start = time.perf_counter()
    _check_inputs(model, train, val)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)

    ckpt = _load_resume_state(config)
    run_id = (ckpt or {}).get("run_id") or run_id or uuid.uuid4().hex[:12]
    plan = plan_privacy(privacy, train, config) if privacy is not None else None
    if plan is not None and plan.unit == "patient" and config.grad_sample_mode == "ghost":
        raise ConfigError("Ghost clipping computes per-image norms without per-image "
                          "gradients, so it cannot clip per patient; use --grad-sample-mode "
                          "hooks or --privacy-unit image.")
    if ckpt is not None and plan is not None and not math.isclose(
            ckpt["noise_multiplier"], plan.noise_multiplier, rel_tol=1e-9):
        raise ConfigError("The checkpoint was trained with different privacy settings; "
                          "resume with the same options or start a new run.")
    if ledger is not None and plan is not None:
        ledger.reserve(train.dataset_id, run_id, plan.history,
                       records=train.privacy_records(plan.unit))

    # A fixed, data-independent front end (e.g. scattering) costs no privacy and
    # is computed once here instead of on every step; only the head is trained.
    fixed = getattr(model, "fixed_features", None)
    if fixed is not None:
        base = model.head.train()
        train_in = fixed_feature_dataset(fixed, train)
        val_in = fixed_feature_dataset(fixed, val) if val is not None else None
    else:
        base, train_in, val_in = model.train(), train, val
    optimizer = make_optimizer(base.parameters(), config)
    data = TensorDataset(train_in.images, train_in.labels)
    shuffle = None  # only plain training shuffles by `seed`; DP samples from the CSPRNG
    engine = None
    criterion: Any = nn.CrossEntropyLoss()
    if plan is not None:
        with warnings.catch_warnings():
            # Opacus warns that its secure_mode is off; privmed's CSPRNG replaces it.
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant=privacy.accountant)
            patients = (torch.from_numpy(train.patient_index[0]) if plan.unit == "patient"
                        else None)
            train_model, optimizer, criterion, loader = make_private(
                engine, module=base, optimizer=optimizer, criterion=criterion, dataset=data,
                sample_rate=plan.sample_rate, steps_per_epoch=plan.steps_per_epoch,
                noise_multiplier=plan.noise_multiplier, max_grad_norm=privacy.max_grad_norm,
                grad_sample_mode=config.grad_sample_mode, rng=SecureRandom(),
                patient_index=patients)
    else:
        shuffle = torch.Generator().manual_seed(config.seed)
        loader = DataLoader(data, batch_size=min(config.batch_size, len(train)), shuffle=True,
                            generator=shuffle)
        train_model = base
    total_steps = len(loader) * config.epochs
    scheduler = make_scheduler(optimizer, config, total_steps)
    ema = (AveragedModel(base, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay))
           if config.ema_decay else None)

    epochs_log: list[dict] = []
    first_epoch = 1
    if ckpt is not None:
        base.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        if engine is not None:
            engine.accountant.history = [tuple(h) for h in ckpt["accountant_history"]]
        torch.set_rng_state(ckpt["rng"])
        if shuffle is not None and ckpt.get("shuffle") is not None:
            shuffle.set_state(ckpt["shuffle"])
        epochs_log = list(ckpt["epochs"])
        first_epoch = ckpt["epoch"] + 1

    def history() -> History:
        return [tuple(h) for h in engine.accountant.history] if engine is not None else []

    def epsilon_now() -> float | None:
        return compute_epsilon(history(), plan.delta, privacy.accountant) if plan else None

    bar = TrainingProgress(total_steps, enabled=progress, private=plan is not None)
    completed = False
    try:
        with bar, warnings.catch_warnings():
            # Opacus's hooks trigger this torch notice on every model whose input needs no grad.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            bar.advance_to((first_epoch - 1) * len(loader))
            for epoch in range(first_epoch, config.epochs + 1):
                t0 = time.perf_counter()
                loss = _train_epoch(train_model, optimizer, scheduler, loader, criterion, ema,
                                    config, bar, ghost=config.grad_sample_mode == "ghost"
                                    and plan is not None,
                                    per_patient=plan is not None and plan.unit == "patient")
                record: dict[str, Any] = {"epoch": epoch, "steps": epoch * len(loader),
                                          "loss": loss}
                if val_in is not None:
                    m = evaluate(_eval_model(base, ema), val_in, config.eval_batch_size)
                    record["val_auc"] = m.get("roc_auc")
                    record["val_accuracy"] = m["accuracy"]
                record["epsilon"] = epsilon_now()
                record["seconds"] = round(time.perf_counter() - t0, 3)
                epochs_log.append(record)
                bar.epoch_done(record, config.epochs)
                if ledger is not None and plan is not None:
                    ledger.update(run_id, history(), train.dataset_id)
                if config.checkpoint_dir is not None:
                    save_checkpoint(config.checkpoint_dir, {
                        "run_id": run_id, "epoch": epoch, "model": base.state_dict(),
                        "ema": ema.state_dict() if ema is not None else None,
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "accountant_history": history(), "rng": torch.get_rng_state(),
                        # DP runs save no sampler state: a resumed run draws a fresh key.
                        "shuffle": shuffle.get_state() if shuffle is not None else None,
                        "epochs": epochs_log,
                        "noise_multiplier": plan.noise_multiplier if plan else None,
                    })
                if on_epoch is not None:
                    on_epoch(record)
        completed = True
    finally:
        if ledger is not None and plan is not None:
            _settle_ledger(ledger, run_id, history(), completed, train.dataset_id)

    final = _eval_model(base, ema)
    # On the (cached) fixed features when there are some: same numbers, no second pass.
    metrics = ({"val": evaluate(final.eval(), val_in, config.eval_batch_size)}
               if val_in is not None else {})
    if fixed is not None:
        model.head = final
        final = model
    trained = copy.deepcopy(final).eval()
    for p in trained.parameters():
        p.requires_grad_(True)
    privacy_record = _privacy_record(privacy, plan, history()) if plan else no_privacy()
    if ledger is not None and plan is not None:
        privacy_record["ledger"] = ledger_status(ledger, train.dataset_id,
                                                 train.privacy_records(plan.unit))
    return FitResult(trained, metrics, epochs_log, privacy_record, config, run_id,
                     time.perf_counter() - start)


def _settle_ledger(ledger: BudgetLedger, run_id: str, history: History, completed: bool,
                   dataset_id: str) -> None:
    """Tell the ledger what was actually released, whatever happened."""
    if completed:
        ledger.commit(run_id, history, dataset_id)
        return
    try:
        if sum(steps for *_, steps in history) == 0:
            ledger.release(run_id, dataset_id)  # nothing was released: give it back
        else:
            ledger.update(run_id, history, dataset_id)  # the reservation stays for --resume
    except Exception:  # never hide the error that stopped training
        pass


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 loader: DataLoader, criterion: Any, ema: AveragedModel | None,
                 config: TrainConfig, bar: TrainingProgress, ghost: bool,
                 per_patient: bool = False) -> float | None:
    model.train()
    total, count = 0.0, 0
    split = (config.physical_batch_size < config.batch_size
             and hasattr(optimizer, "noise_multiplier"))
    if per_patient:  # physical batches cut between patients, each told to the optimizer
        manager = nullcontext(patient_batches(
            loader, optimizer, config.physical_batch_size if split else None))
    elif split:
        manager = BatchMemoryManager(data_loader=loader, optimizer=optimizer,
                                     max_physical_batch_size=config.physical_batch_size)
    else:
        manager = nullcontext(loader)
    with manager as batches:
        for images, labels in batches:
            optimizer.zero_grad(set_to_none=True)
            if images.shape[0] == 0 and not ghost:
                # An empty Poisson batch still takes a (pure-noise) step. Opacus clips
                # per-sample gradients, here none; functorch cannot run GroupNorm on an
                # empty batch, so they are given directly (ghost clipping runs it fine).
                for p in optimizer.params:
                    p.grad_sample = p.new_zeros((0, *p.shape))
                optimizer.step()
            else:
                loss = criterion(model(images), labels)
                loss.backward()
                optimizer.step()
                if images.shape[0]:  # an empty batch's mean loss is NaN
                    total += float(loss.detach()) * images.shape[0]
                    count += images.shape[0]
            if getattr(optimizer, "_is_last_step_skipped", False):
                continue
            scheduler.step()
            if ema is not None:
                ema.update_parameters(_unwrap(model))
            bar.step(total / max(count, 1))
    return total / count if count else None




@torch.no_grad()
def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_module", model)


def _eval_model(base: nn.Module, ema: AveragedModel | None) -> nn.Module:
    return ema.module if ema is not None and int(ema.n_averaged) > 0 else base


def make_optimizer(params: Any, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser of central training and of the federation's server step (FedSGD)."""
    params = [p for p in params if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total: int) -> Any:
    """``config.lr_schedule`` over ``total`` steps (cosine decay, or constant)."""
    inner = getattr(optimizer, "original_optimizer", optimizer)
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            inner, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(total, 1))))
    return torch.optim.lr_scheduler.LambdaLR(inner, lambda s: 1.0)


def _check_inputs(model: nn.Module, train: ImageDataset, val: ImageDataset | None) -> None:
    with torch.no_grad():
        try:
            out = model.eval()(train.images[:2])
        except RuntimeError as exc:
            raise ConfigError(f"The model cannot take images of shape {train.image_shape}: "
                              f"{str(exc).splitlines()[0]}") from None
    if out.ndim != 2 or out.shape[1] != train.num_classes:
        raise ConfigError(f"The model outputs shape {tuple(out.shape[1:])} per image but the "
                          f"data has {train.num_classes} classes.")
    if val is not None and val.class_names != train.class_names:
        raise ConfigError("Validation and training data have different classes.")


def _load_resume_state(config: TrainConfig) -> dict | None:
    if not config.resume:
        return None
    if config.checkpoint_dir is None:
        raise ConfigError("Resuming needs a checkpoint directory (the run's output folder).")
    ckpt = load_checkpoint(config.checkpoint_dir)
    if ckpt is None:
        raise ConfigError(f"Nothing to resume: no checkpoint in {config.checkpoint_dir}.")
    return ckpt


def _privacy_record(privacy: PrivacyConfig, plan: DPPlan, history: History) -> dict:
    return {
        "enabled": True,
        "epsilon": compute_epsilon(history, plan.delta, privacy.accountant),
        "delta": plan.delta,
        "accountant": privacy.accountant,
        "target_epsilon": privacy.target_epsilon,
        "noise_multiplier": plan.noise_multiplier,
        "max_grad_norm": privacy.max_grad_norm,
        "sample_rate": plan.sample_rate,
        "unit": plan.unit,
        "units": plan.units,
        "history": history_to_json(history),
        "epsilon_curve": [{"steps": s, "epsilon": e} for s, e in
                          epsilon_curve(history, plan.delta, privacy.accountant)],
        "ledger": None,
    }


def ledger_status(ledger: BudgetLedger, dataset_id: str,
                  records: PrivacyRecords | None = None) -> dict:
    """The ledger's figures for the run's records: spent is the most charged record's ε,
    remaining the least any record has left."""
    budget = ledger.budget(dataset_id)
    return {"path": str(Path(ledger.path)), "dataset_id": dataset_id,
            "unit": records.unit if records is not None else None,
            "budget_epsilon": budget["epsilon"] if budget else None,
            "spent_epsilon": ledger.spent(dataset_id, records=records),
            "remaining_epsilon": (ledger.remaining(dataset_id, records=records)
                                  if budget else None)}
