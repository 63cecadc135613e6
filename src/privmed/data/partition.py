"""Split one data set across federated sites: IID or Dirichlet label skew.

The Dirichlet scheme is the usual non-IID benchmark of the FL literature (Hsu et al. 2019,
arXiv:1909.06335; NIID-Bench, Li et al. 2022): for every class, the share each site gets is
drawn from ``Dir(alpha)``; small ``alpha`` means strong skew. Draws are repeated until every
site holds at least ``min_per_site`` samples.

When the patients are known, the unit dealt to sites is the patient, not the image: a
patient whose images sat at two sites would be two people to the sites' separate DP
accounting while being one person, and would leak between their train and test data.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real

import numpy as np
import torch

from privmed.data.dataset import DataBundle, ImageDataset
from privmed.errors import ConfigError

SCHEMES = ("iid", "dirichlet")
DEFAULT_MIN_PER_SITE = 10


def _as_labels(labels: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    arr = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"Labels to partition must be integers, got dtype {arr.dtype}.")
    return arr.astype(np.int64)


def _min_per_site(min_per_site: int | None, num_sites: int, n: int, noun: str) -> int:
    """``min_per_site`` (default ``min(10, n // num_sites)``), refused unless every site
    can have that many of the ``n`` records."""
    if min_per_site is None:
        min_per_site = min(DEFAULT_MIN_PER_SITE, n // num_sites)
    if min_per_site < 0 or min_per_site * num_sites > n:
        raise ConfigError(f"Cannot give each of {num_sites} sites at least {min_per_site} of "
                          f"{n} {noun}; lower min_per_site or use fewer sites.")
    return min_per_site


def partition_indices(labels: Sequence[int] | np.ndarray | torch.Tensor, num_sites: int,
                      scheme: str = "iid", alpha: float = 0.5, seed: int = 0,
                      min_per_site: int | None = None, max_tries: int = 1000
                      ) -> list[np.ndarray]:
    """Indices (sorted int64 arrays) of the samples each of ``num_sites`` sites receives.

    Every sample goes to exactly one site. ``min_per_site`` defaults to
    ``min(10, len(labels) // num_sites)``. Same arguments -> same partition.
    """
    y = _as_labels(labels)
    n = y.shape[0]
    _check_sites(num_sites, n, "samples")
    if scheme not in SCHEMES:
        raise ConfigError(f"Unknown partition scheme '{scheme}'; use one of {list(SCHEMES)}.")
    min_per_site = _min_per_site(min_per_site, num_sites, n, "samples")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_sites)]

    if not (isinstance(alpha, Real) and np.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"Dirichlet alpha must be a positive number, got {alpha}.")
    classes = np.unique(y)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        sizes = np.zeros(num_sites, dtype=np.int64)
        for k in classes:
            idx = rng.permutation(np.flatnonzero(y == k))
            share = rng.dirichlet(np.full(num_sites, float(alpha)))
            # Sites already above an even share get no more (NIID-Bench's balancing step),
            # which keeps site sizes from drifting to extremes.
            share = share * (sizes < n / num_sites)
            share = share / share.sum() if share.sum() > 0 else np.full(num_sites, 1 / num_sites)
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(np.int64)
            for site, piece in enumerate(np.split(idx, cuts)):
                parts[site].append(piece)
                sizes[site] += len(piece)
        if sizes.min() >= min_per_site:
            return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    raise ConfigError(f"Could not give each of {num_sites} sites at least {min_per_site} "
                      f"samples with Dirichlet alpha={alpha} in {max_tries} draws; raise alpha, "
                      "lower min_per_site or use fewer sites.")


def _check_sites(num_sites: int, n: int, what: str) -> None:
    if isinstance(num_sites, bool) or not isinstance(num_sites, int | np.integer) \
            or num_sites < 1:
        raise ConfigError(f"The number of sites must be a positive integer, got {num_sites!r}.")
    if num_sites > n:
        raise ConfigError(f"Cannot split {n} {what} across {num_sites} sites; "
                          f"use at most {n} sites.")


def _majority(y: np.ndarray, owner: np.ndarray, m: int) -> np.ndarray:
    """Each patient's most frequent label (ties: the lowest)."""
    counts = np.zeros((m, int(y.max()) + 1 if y.size else 1), dtype=np.int64)
    np.add.at(counts, (owner, y), 1)
    return counts.argmax(axis=1)


def _cut(sizes: np.ndarray, share: np.ndarray) -> np.ndarray:
    """Site of each patient (in the given order) so that the sites get about ``share`` of
    the images: a patient goes where the middle of their images falls."""
    cum = np.cumsum(sizes)
    middle = (cum - sizes / 2.0) / max(int(cum[-1]), 1)
    return np.minimum(np.searchsorted(np.cumsum(share), middle, side="right"), len(share) - 1)


def partition_patients(labels: Sequence[int] | np.ndarray | torch.Tensor,
                       patients: Sequence[str], num_sites: int, scheme: str = "iid",
                       alpha: float = 0.5, seed: int = 0, min_per_site: int | None = None,
                       max_tries: int = 1000) -> list[np.ndarray]:
    """Like :func:`partition_indices`, but every patient's images go to one site.

    IID deals shuffled patients so that the sites get about equal numbers of images;
    Dirichlet skews each class's patients (a patient's class is their majority label)
    across sites. ``min_per_site`` counts images.
    """
    y = _as_labels(labels)
    ids = np.asarray([str(p) for p in patients])
    if ids.shape[0] != y.shape[0]:
        raise ConfigError(f"{y.shape[0]} labels but {ids.shape[0]} patient ids to partition.")
    names, owner = np.unique(ids, return_inverse=True)
    m, n = len(names), y.shape[0]
    _check_sites(num_sites, m, "patients")
    if scheme not in SCHEMES:
        raise ConfigError(f"Unknown partition scheme '{scheme}'; use one of {list(SCHEMES)}.")
    if scheme == "dirichlet" and not (isinstance(alpha, Real) and np.isfinite(alpha)
                                      and alpha > 0):
        raise ConfigError(f"Dirichlet alpha must be a positive number, got {alpha}.")
    min_per_site = _min_per_site(min_per_site, num_sites, n, "images")
    sizes = np.bincount(owner, minlength=m)
    strata = _majority(y, owner, m)
    rng = np.random.default_rng(seed)
    even = np.full(num_sites, 1.0 / num_sites)
    for _ in range(max_tries):
        site = np.empty(m, dtype=np.int64)
        if scheme == "iid":
            order = rng.permutation(m)
            site[order] = _cut(sizes[order], even)
        else:
            loads = np.zeros(num_sites, dtype=np.int64)
            for k in np.unique(strata):
                order = rng.permutation(np.flatnonzero(strata == k))
                share = rng.dirichlet(np.full(num_sites, float(alpha)))
                share = share * (loads < n / num_sites)  # NIID-Bench's balancing step
                share = share / share.sum() if share.sum() > 0 else even
                site[order] = _cut(sizes[order], share)
                loads += np.bincount(site[order], weights=sizes[order],
                                     minlength=num_sites).astype(np.int64)
        per_image = site[owner]
        counts = np.bincount(per_image, minlength=num_sites)
        if counts.min() >= max(min_per_site, 1):
            return [np.flatnonzero(per_image == s).astype(np.int64) for s in range(num_sites)]
    raise ConfigError(f"Could not give each of {num_sites} sites at least "
                      f"{max(min_per_site, 1)} images of whole patients ({scheme}) in "
                      f"{max_tries} draws; lower min_per_site or use fewer sites.")


def _follow_patients(labels: np.ndarray, patients: Sequence[str], known: dict[str, int],
                     share: np.ndarray, seed: int) -> list[np.ndarray]:
    """Split a val split by whole patients: one already at a site (in its train) stays
    there, the others follow each site's share of their majority class."""
    rng = np.random.default_rng([seed, 2])  # own stream, as in _follow_partition
    num_sites = share.shape[0]
    names, owner = np.unique(np.asarray([str(p) for p in patients]), return_inverse=True)
    sizes = np.bincount(owner, minlength=len(names))
    strata = _majority(labels, owner, len(names))
    site = np.array([known.get(str(p), -1) for p in names], dtype=np.int64)
    for k in np.unique(strata):
        order = rng.permutation(np.flatnonzero((strata == k) & (site < 0)))
        if order.size == 0:
            continue
        weights = share[:, k].astype(np.float64) if k < share.shape[1] else np.zeros(0)
        if weights.size == 0 or weights.sum() == 0:
            weights = np.ones(num_sites)
        site[order] = _cut(sizes[order], weights / weights.sum())
    per_image = site[owner]
    return [np.flatnonzero(per_image == s).astype(np.int64) for s in range(num_sites)]


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total``, proportional to ``weights``."""
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def _follow_partition(labels: np.ndarray, ref_labels: np.ndarray, ref_parts: list[np.ndarray],
                      num_classes: int, seed: int) -> list[np.ndarray]:
    """Split ``labels`` so each site's class mix follows its share of ``ref_labels``."""
    rng = np.random.default_rng([seed, 1])  # own stream: val never perturbs the train split
    share = np.stack([np.bincount(ref_labels[p], minlength=num_classes) for p in ref_parts])
    out: list[list[np.ndarray]] = [[] for _ in ref_parts]
    for k in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == k))
        if idx.size == 0:
            continue
        weights = share[:, k].astype(np.float64)
        if weights.sum() == 0:
            weights = np.ones(len(ref_parts))
        cuts = np.cumsum(_largest_remainder(weights, idx.size))[:-1]
        for site, piece in enumerate(np.split(idx, cuts)):
            out[site].append(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64)
            for p in out]


def split_sites(bundle: DataBundle, num_sites: int, scheme: str = "iid", alpha: float = 0.5,
                seed: int = 0, min_per_site: int | None = None) -> list[DataBundle]:
    """One DataBundle per site, holding that site's part of ``train`` (and ``val``).

    ``val`` is split so each site's class mix follows its train mix (a site with no val
    images gets ``val=None``). When the patients are known, whole patients are dealt
    (:func:`partition_patients`), and a val patient goes to the site that has them in
    train, if any. The test split is NOT handed to sites: every site bundle has
    ``test=None`` and the coordinator evaluates on ``bundle.test`` itself.
    """
    if min_per_site is not None and min_per_site < 1:
        raise ConfigError(f"Every site needs at least one training image, got "
                          f"min_per_site={min_per_site}.")
    train_labels = bundle.train.labels.numpy()
    train_ids = bundle.train.patient_ids
    if train_ids is not None:
        train_parts = partition_patients(train_labels, train_ids, num_sites, scheme, alpha,
                                         seed, min_per_site)
    else:
        train_parts = partition_indices(train_labels, num_sites, scheme, alpha, seed,
                                        min_per_site)
    val_parts: list[np.ndarray | None] = [None] * len(train_parts)
    if bundle.val is not None and bundle.val.patient_ids is not None:
        known = {train_ids[i]: site for site, part in enumerate(train_parts)
                 for i in part.tolist()} if train_ids is not None else {}
        share = np.stack([np.bincount(train_labels[p], minlength=bundle.train.num_classes)
                          for p in train_parts])
        val_parts = list(_follow_patients(bundle.val.labels.numpy(), bundle.val.patient_ids,
                                          known, share, seed))
    elif bundle.val is not None:
        val_parts = list(_follow_partition(bundle.val.labels.numpy(), train_labels, train_parts,
                                           bundle.train.num_classes, seed))

    def part(ds: ImageDataset | None, idx: np.ndarray | None, site: int) -> ImageDataset | None:
        if ds is None or idx is None or idx.size == 0:
            return None
        return ds.subset(idx, name=f"{ds.name}@site{site}")

    sites = []
    for site, (tr, va) in enumerate(zip(train_parts, val_parts, strict=True)):
        info = {**bundle.info, "site": site, "num_sites": num_sites, "scheme": scheme,
                "alpha": alpha if scheme == "dirichlet" else None, "seed": seed,
                "parent_source": bundle.source, "train_indices": tr.tolist(),
                "val_indices": va.tolist() if va is not None else [],
                "by": "patient" if train_ids is not None else "image"}
        train = bundle.train.subset(tr, name=f"{bundle.train.name}@site{site}")
        sites.append(DataBundle(train, part(bundle.val, va, site), None,
                                source=f"{bundle.source}#site{site}", info=info))
    return sites
