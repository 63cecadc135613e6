"""Membership inference against a trained privmed model: LiRA, LOSS and a one-run audit.

* **LOSS** (Yeom et al. 2018): the target's log-probability of the true label.
* **LiRA** (Carlini et al. 2022): K shadow models trained with the run's own recipe
  (:func:`fit`) on random halves of the population, each example IN for exactly half
  of them. Per example, Gaussians are fitted to the shadows' scaled logits ``phi``:
  OUT only (offline, one-sided ``-log P[Z_out > phi]``) or IN and OUT (online,
  likelihood ratio). With fewer than 32 shadows per side one variance is pooled over
  all examples (the paper's fixed-variance variant).
* **One run** (Steinke, Nasr & Jagielski 2023): canaries each included with probability
  1/2, one training run, guesses on the highest and lowest scored canaries.

Members are drawn per patient or per image (:mod:`privmed.audit.patients`): per patient,
all of a patient's images are IN or OUT together and a patient is scored by the mean of
their images' scores. ROC metrics and epsilon lower bounds come from
:mod:`privmed.audit.epsilon`, over the unit, next to the claimed ε of that unit.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from privmed.audit.epsilon import empirical_epsilon, one_run_epsilon, roc_metrics
from privmed.audit.lira import (  # the scores, re-exported where callers have found them
    lira_offline,
    lira_online,
    loss_scores,
    pooled_variance,
    scaled_logits,
)
from privmed.audit.patients import (
    AGGREGATION,
    audit_unit,
    build_population,
    check_disjoint,
    images_of,
    unit_claim,
    unit_groups,
    unit_labels,
    unit_scores,
)
from privmed.data.dataset import DataBundle, ImageDataset
from privmed.errors import ConfigError, DataError
from privmed.models import create_model, load_model, model_kwargs
from privmed.privacy import PrivacyConfig
from privmed.privacy.dpsgd import patient_members
from privmed.privacy.records import resolve_unit
from privmed.report import read_results
from privmed.training.config import TrainConfig
from privmed.training.features import fixed_feature_dataset
from privmed.training.fit import fit

Progress = Callable[[int, int], None]


@torch.no_grad()
def model_logits(model: nn.Module, dataset: ImageDataset, batch_size: int = 512) -> np.ndarray:
    """The model's logits (float64, N x classes) for every image of ``dataset``.

    A fixed front end (``model.fixed_features``, e.g. scattering) is computed once per
    dataset and cached, so scoring many shadow models on one population is cheap."""
    model.eval()
    fixed = getattr(model, "fixed_features", None)
    if fixed is not None:
        model, dataset = model.head.eval(), fixed_feature_dataset(fixed, dataset, batch_size)
    out = [model(dataset.images[i:i + batch_size]).double()
           for i in range(0, len(dataset), batch_size)]
    return torch.cat(out).numpy()


def assign_shadows(n: int, shadows: int, rng: np.random.Generator) -> np.ndarray:
    """``shadows x n`` booleans: each example IN for exactly ``shadows // 2`` shadows."""
    return rng.uniform(size=(shadows, n)).argsort(axis=0) < shadows // 2


class Recipe(NamedTuple):
    model: nn.Module
    name: str
    kwargs: dict[str, Any]
    config: TrainConfig
    privacy: PrivacyConfig | None
    results: dict[str, Any]


def read_recipe(run_dir: Path, bundle: DataBundle) -> Recipe:
    results = read_results(run_dir)
    model, info = load_model(run_dir / "model.pt")
    name = info.get("name")
    if not name:
        raise ConfigError(f"The run in {run_dir} trained a custom model file; the membership "
                          "audit needs a registered model to train its shadow models.")
    train = bundle.train
    if tuple(info["image_shape"]) != train.image_shape:
        raise DataError(f"The data's images have shape {train.image_shape} but the model in "
                        f"{run_dir} expects {tuple(info['image_shape'])}; pass the data the "
                        "run was trained on.")
    if tuple(info["class_names"]) != train.class_names:
        raise DataError(f"The data's classes {list(train.class_names)} differ from the "
                        f"model's {list(info['class_names'])} in {run_dir}.")
    if results["data"]["dataset_id"] != train.dataset_id:
        raise DataError(f"The training split of the data (id {train.dataset_id}) is not the "
                        f"one the run in {run_dir} was trained on (id "
                        f"{results['data']['dataset_id']}); load the data as for training.")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = {k: v for k, v in results["training"]["config"].items() if k in fields}
    cfg.update(checkpoint_dir=None, resume=False)
    p = results["privacy"]
    privacy = None
    if p["enabled"]:
        if not p.get("noise_multiplier") or not p.get("max_grad_norm"):
            raise DataError(f"The results in {run_dir} lack the noise multiplier or clipping "
                            "norm the shadow models need.")
        # The run's unit (results before patient-level DP: image), so that shadows
        # train at it rather than at whatever "auto" makes of the audit population.
        privacy = PrivacyConfig(noise_multiplier=p["noise_multiplier"], delta=p["delta"],
                                max_grad_norm=p["max_grad_norm"], accountant=p["accountant"],
                                unit=p.get("unit") or "image")
    return Recipe(model, name, dict(info.get("kwargs") or {}), TrainConfig(**cfg), privacy,
                   results)


def train_shadows(population: ImageDataset, keep: np.ndarray, *, model_name: str,
                  kwargs: dict[str, Any], config: TrainConfig, privacy: PrivacyConfig | None,
                  target_train_size: int, seed: int = 0,
                  progress: Progress | None = None) -> tuple[np.ndarray, dict]:
    """Train one shadow model per row of ``keep``; returns their scaled logits (K x n).

    Shadows train at ``privacy.unit``: per patient, the subsets keep the population's
    patient ids (``keep`` then holds a patient's images together). The batch size is
    scaled by (mean shadow set size / target training-set size, in images), so each
    shadow takes the target's number of steps at its sampling rate and noise multiplier:
    the same (epsilon, delta) as the target. ``seed`` fixes the shadows' initialisation;
    under DP their sampling and noise are :func:`fit`'s, from a fresh CSPRNG key, so
    DP shadow scores vary between audits (within the audit's statistical error).
    """
    shadows, n = keep.shape
    size = max(1, round(float(keep.sum(axis=1).mean())))  # n / 2 when drawn per image
    batch = max(1, round(config.batch_size * size / target_train_size))
    base = dataclasses.replace(config, batch_size=batch, checkpoint_dir=None, resume=False,
                               physical_batch_size=min(config.physical_batch_size, batch))
    labels = population.labels.numpy()
    phi = np.empty((shadows, n))
    t0 = time.perf_counter()
    if progress is not None:
        progress(0, shadows)
    for k in range(shadows):
        subset = population.subset(np.flatnonzero(keep[k]), name=f"shadow {k}")
        shadow_privacy = None
        if privacy is not None:  # accounting only (rdp: fast); delta must stay below 1/N
            units = subset.num_patients if privacy.unit == "patient" else len(subset)
            shadow_privacy = dataclasses.replace(
                privacy, accountant="rdp", delta=min(privacy.delta or 1.0, 0.5 / units))
        cfg = dataclasses.replace(base, seed=seed * 1009 + k + 1)
        torch.manual_seed(cfg.seed)  # fit() seeds after the model exists: seed its init too
        model = create_model(model_name, population.image_shape[0], population.num_classes,
                             **kwargs)
        result = fit(model, subset, None, cfg, shadow_privacy)
        phi[k] = scaled_logits(model_logits(result.model, population, cfg.eval_batch_size),
                               labels)
        if progress is not None:
            progress(k + 1, shadows)
    info = {"train_size": size, "batch_size": batch, "epochs": config.epochs,
            "unit": privacy.unit if privacy else None,
            "noise_multiplier": privacy.noise_multiplier if privacy else None,
            "seconds": round(time.perf_counter() - t0, 3)}
    return phi, info


def _attack_record(scores: np.ndarray, member: np.ndarray, delta: float, confidence: float,
                   seed: int) -> dict:
    return {**roc_metrics(scores[member], scores[~member]),
            "epsilon": empirical_epsilon(scores[member], scores[~member], delta,
                                         confidence=confidence, seed=seed)}


def _matched_by_class(inside: np.ndarray, outside: np.ndarray, n: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (or fewer) members and as many non-members with the same count per class:
    train and test splits often differ in class balance (PneumoniaMNIST: 74% vs 63%
    pneumonia), and a score that tracks the label would pass for membership signal."""
    classes = np.union1d(inside, outside)
    avail = np.array([min((inside == c).sum(), (outside == c).sum()) for c in classes])
    share = avail / max(1, avail.sum())
    counts = np.minimum(avail, np.floor(share * n).astype(int))
    for i in np.argsort(-(share * n - counts)):  # hand out the remainder
        if counts.sum() >= min(n, avail.sum()):
            break
        if counts[i] < avail[i]:
            counts[i] += 1
    pick_in, pick_out = [], []
    for c, k in zip(classes, counts, strict=True):
        pick_in.append(rng.choice(np.flatnonzero(inside == c), k, replace=False))
        pick_out.append(rng.choice(np.flatnonzero(outside == c), k, replace=False))
    return np.sort(np.concatenate(pick_in)), np.sort(np.concatenate(pick_out))


def audit_membership(run_dir: Path, bundle: DataBundle, *, shadows: int = 8, online: bool = True,
                     seed: int = 0, max_examples: int | None = None,
                     progress: Progress | None = None, confidence: float = 0.95,
                     unit: str | None = None) -> dict:
    """Attack a finished run: LiRA (online or offline) and LOSS, with epsilon lower bounds.

    Members are the run's training split (``bundle.train``, which must be the data the
    run was trained on); non-members the val split (or test without one). The game is
    played per ``unit``: 'patient' (a patient's images in or out together, scored by
    their mean), 'image', or None / 'auto' for the run's own DP unit (patient whenever
    the data names its patients, for a run without DP). As many members as non-members
    are sampled, ``min`` of the two splits' units or ``max_examples // 2``, with the same
    number per class on both sides (a patient's class: their most frequent label).
    ``shadows`` shadow models are trained with the run's recipe (model, TrainConfig,
    noise multiplier, clipping norm and unit from results.json / model.pt) on random
    halves of members and non-members. Shadow models are the auditor's own, trained on
    the population and never released, so they are not charged to the privacy ledger.
    ``progress(done, total)`` is called as shadow models finish.

    Returns ``{"membership": {...}}`` (strict JSON) for results.json's ``audit``
    section, with the claimed ε of the same unit. ``eps_lb`` is the larger of the LiRA
    and LOSS bounds; each holds with probability ``confidence``, so the larger with at
    least ``2 * confidence - 1``.
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    if shadows < (2 if online else 1):
        raise ConfigError(f"{'Online' if online else 'Offline'} LiRA needs at least "
                          f"{2 if online else 1} shadow models, got {shadows}.")
    recipe = read_recipe(run_dir, bundle)
    train = bundle.train
    run_unit = recipe.privacy.unit if recipe.privacy is not None else None
    if run_unit == "patient" and train.patient_ids is None:
        raise DataError(f"The run in {run_dir} is private per patient but the data names "
                        "no patients; load it with its patient ids, as for training.")
    unit = audit_unit(unit, run_unit, train.patient_ids is not None)
    # val first: it is drawn from the training distribution; an official test split may be
    # shifted (PneumoniaMNIST's is), and a shift would pass for membership signal.
    outside = bundle.val if bundle.val is not None else bundle.test
    if outside is None:
        raise DataError("The data has no val or test split to draw non-members from.")
    if unit == "patient":
        check_disjoint(train, outside)
    g_in, u_in = unit_groups(train, unit)
    g_out, u_out = unit_groups(outside, unit)
    n = min(u_in, u_out, max_examples // 2 if max_examples is not None else u_out)
    if n < 2:
        raise ConfigError(f"The audit needs at least two member and two non-member {unit}s.")
    rng = np.random.default_rng(seed)
    pick_in, pick_out = _matched_by_class(
        unit_labels(train.labels.numpy(), g_in, u_in, train.num_classes),
        unit_labels(outside.labels.numpy(), g_out, u_out, train.num_classes), n, rng)
    n = len(pick_in)
    if n < 2:
        raise ConfigError(f"The audit needs at least two member and two non-member {unit}s "
                          "of the same classes.")
    idx_in, grp_in = images_of(patient_members(g_in), pick_in)
    idx_out, grp_out = images_of(patient_members(g_out), pick_out)
    population = build_population(train, outside, idx_in, idx_out)
    group = np.r_[grp_in, grp_out + n]  # the unit of each population image: members first
    is_member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    labels = population.labels.numpy()

    # IN / OUT drawn per unit, then given to each of its images: a patient's images are
    # in or out of a shadow's training set together.
    keep = assign_shadows(2 * n, shadows, rng)[:, group]
    shadow_phi, shadow_info = train_shadows(
        population, keep, model_name=recipe.name, kwargs=recipe.kwargs, config=recipe.config,
        privacy=recipe.privacy, target_train_size=len(train), seed=seed,
        progress=progress)
    logits = model_logits(recipe.model, population, recipe.config.eval_batch_size)
    target_phi = scaled_logits(logits, labels)

    claim = unit_claim(recipe.results["privacy"], unit, train)
    delta = claim["delta"]
    attack = lira_online if online else lira_offline

    def scored(per_image: np.ndarray) -> dict:
        return _attack_record(unit_scores(per_image, group, 2 * n), is_member, delta,
                              confidence, seed)

    record: dict[str, Any] = {
        "attack": "lira-online" if online else "lira-offline", "unit": unit,
        "shadows": shadows, "examples": 2 * n, "members": n, "nonmembers": n,
        "images": len(population), "member_images": len(idx_in),
        "score_aggregation": AGGREGATION if unit == "patient" else None,
        "variance": "global" if pooled_variance(keep, None) else "per-example",
        "lira": scored(attack(target_phi, shadow_phi, keep)),
        "loss": scored(loss_scores(logits, labels)),
    }
    if online:
        record["lira_offline"] = scored(lira_offline(target_phi, shadow_phi, keep))
    eps_lb = max(record["lira"]["epsilon"]["eps_lb"], record["loss"]["epsilon"]["eps_lb"])
    claimed = claim["epsilon"]
    record.update({
        "eps_lb": eps_lb, "confidence": confidence, "claimed_epsilon": claimed, "delta": delta,
        "claimed_unit": unit, "run_unit": claim["run_unit"], "claim_basis": claim["basis"],
        "consistent": claimed is None or eps_lb <= claimed,
        "shadow_training": shadow_info, "seconds": round(time.perf_counter() - start, 3),
    })
    return {"membership": _strict_json(record)}


def one_run_audit(bundle: DataBundle, *, model_name: str, config: TrainConfig,
                  privacy: PrivacyConfig | None, canaries: int = 100,
                  guesses: int | None = None, seed: int = 0,
                  confidence: float = 0.95, unit: str | None = None) -> dict:
    """Steinke, Nasr & Jagielski (2023): audit a training recipe in one training run.

    ``canaries`` training units (patients or images, ``unit`` as in
    :func:`audit_membership`, the recipe's DP unit by default) get wrong labels
    (mislabeled canaries are easy to memorise and are what DP must hide); each is kept
    in the training set with probability 1/2, a patient with all of their images (the
    other training images always). One model is trained with :func:`fit`, canaries are
    scored by LOSS on their wrong labels (a patient: the mean over their images), and
    the auditor guesses "in" for the ``guesses // 2`` highest and "out" for as many
    lowest (default: half the canaries). The trained model is discarded, never released.
    Returns ``{"one_run": {...}}`` with the guesses, the correct ones and
    :func:`one_run_epsilon` next to the claimed epsilon of that unit.
    """
    start = time.perf_counter()
    train = bundle.train
    known = train.patient_ids is not None
    run_unit = resolve_unit(privacy.unit, known) if privacy is not None else None
    unit = audit_unit(unit, run_unit, known)
    group, units = unit_groups(train, unit)
    if canaries < 4 or canaries > units // 2:
        raise ConfigError(f"The one-run audit needs between 4 and half the training {unit}s "
                          f"({units // 2}) as canaries, got {canaries}.")
    guesses = 2 * (canaries // 4) if guesses is None else guesses
    if guesses % 2 or not 2 <= guesses <= canaries:
        raise ConfigError(f"Guesses must be an even number between 2 and the number of "
                          f"canaries ({canaries}), got {guesses}.")
    k = guesses // 2
    rng = np.random.default_rng(seed)
    order = rng.permutation(units)
    members = patient_members(group)
    c_idx, c_group = images_of(members, order[:canaries])
    rest = images_of(members, order[canaries:])[0]
    shift = rng.integers(1, train.num_classes, len(c_idx))
    wrong = (train.labels[c_idx].numpy() + shift) % train.num_classes
    ids = train.patient_ids
    canary_set = ImageDataset(train.images[c_idx], torch.as_tensor(wrong), train.class_names,
                              "canaries", None if ids is None else [ids[i] for i in c_idx])
    included = rng.random(canaries) < 0.5  # per unit: a patient's images go in together
    kept = canary_set.subset(np.flatnonzero(included[c_group]))
    base = train.subset(np.sort(rest))
    training = ImageDataset(torch.cat([base.images, kept.images]),
                            torch.cat([base.labels, kept.labels]), train.class_names,
                            "training with canaries", None if ids is None else
                            base.patient_ids + kept.patient_ids)
    cfg = dataclasses.replace(config, checkpoint_dir=None, resume=False)
    torch.manual_seed(cfg.seed)
    model = create_model(model_name, train.image_shape[0], train.num_classes,
                         **model_kwargs(model_name, train.image_shape))
    result = fit(model, training, None, cfg, privacy)
    scores = unit_scores(loss_scores(model_logits(result.model, canary_set,
                                                  cfg.eval_batch_size), wrong),
                         c_group, canaries)
    ranked = np.argsort(-scores, kind="stable")
    correct = int(included[ranked[:k]].sum() + (~included[ranked[-k:]]).sum())
    claim = unit_claim(result.privacy, unit, training)
    delta = claim["delta"] if result.privacy["enabled"] else 0.0
    eps_lb = one_run_epsilon(correct, 2 * k, confidence=confidence, delta=delta,
                             canaries=canaries)
    claimed = claim["epsilon"]
    return {"one_run": _strict_json({
        "unit": unit, "canaries": canaries, "canary_images": len(c_idx),
        "canary_kind": "mislabeled", "included": int(included.sum()),
        "guesses": 2 * k, "correct": correct, "eps_lb": eps_lb, "confidence": confidence,
        "claimed_epsilon": claimed, "claimed_unit": unit, "run_unit": claim["run_unit"],
        "claim_basis": claim["basis"], "delta": delta if delta else None,
        "consistent": claimed is None or eps_lb <= claimed,
        "model": model_name, "seconds": round(time.perf_counter() - start, 3),
    })}


def _strict_json(value: Any) -> Any:
    """Plain Python values only; NaN and infinities become None."""
    if isinstance(value, dict):
        return {str(k): _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_strict_json(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    return value
