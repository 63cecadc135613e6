"""Site partitions: IID / Dirichlet label skew, reproducibility, minimum sizes, errors."""

from __future__ import annotations

import numpy as np
import pytest

from privmed.data import make_synthetic, partition_indices, split_sites
from privmed.errors import ConfigError

LABELS = np.repeat(np.arange(4), [250, 250, 250, 250])


def _is_partition(parts: list[np.ndarray], n: int) -> bool:
    joined = np.concatenate(parts)
    return len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))


def _skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance between site label mixes and the global mix."""
    k = labels.max() + 1
    glob = np.bincount(labels, minlength=k) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - glob).sum()
                          for p in parts]))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_covers_everything_once_and_is_reproducible(scheme: str) -> None:
    a = partition_indices(LABELS, 5, scheme=scheme, alpha=0.5, seed=7)
    b = partition_indices(LABELS, 5, scheme=scheme, alpha=0.5, seed=7)
    c = partition_indices(LABELS, 5, scheme=scheme, alpha=0.5, seed=8)
    assert _is_partition(a, len(LABELS))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert all(len(p) >= 10 for p in a)


def test_iid_is_balanced_and_dirichlet_skews() -> None:
    iid = partition_indices(LABELS, 5, "iid", seed=0)
    assert {len(p) for p in iid} == {200}
    skew_iid = _skew(iid, LABELS)
    skew_mild = _skew(partition_indices(LABELS, 5, "dirichlet", alpha=100.0, seed=0), LABELS)
    skew_strong = _skew(partition_indices(LABELS, 5, "dirichlet", alpha=0.1, seed=0), LABELS)
    assert skew_iid < 0.1 and skew_mild < 0.1
    assert skew_strong > 0.4 and skew_strong > 3 * skew_iid


def test_min_per_site_is_honoured_by_resampling() -> None:
    args = {"num_sites": 5, "scheme": "dirichlet", "alpha": 0.2, "min_per_site": 60}
    resampled = 0
    for seed in range(10):
        try:
            partition_indices(LABELS, seed=seed, max_tries=1, **args)
        except ConfigError:  # the first draw left a site short ...
            parts = partition_indices(LABELS, seed=seed, **args)  # ... so it draws again
            assert min(len(p) for p in parts) >= 60 and _is_partition(parts, len(LABELS))
            resampled += 1
    assert resampled >= 2


def test_impossible_requests_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="at most 3 sites"):
        partition_indices([0, 1, 0], 4)
    with pytest.raises(ConfigError, match="at least 400"):
        partition_indices(LABELS, 3, min_per_site=400)
    with pytest.raises(ConfigError, match="Unknown partition scheme"):
        partition_indices(LABELS, 3, scheme="pathological")
    with pytest.raises(ConfigError, match="alpha"):
        partition_indices(LABELS, 3, scheme="dirichlet", alpha=0)
    with pytest.raises(ConfigError, match="positive integer"):
        partition_indices(LABELS, 0)
    with pytest.raises(ConfigError, match="Could not give"):
        partition_indices(LABELS, 20, "dirichlet", alpha=0.01, min_per_site=50, max_tries=5)


def test_split_sites_train_val_follow_and_no_test() -> None:
    bundle = make_synthetic(n_train=300, n_val=100, n_test=50, size=12)
    sites = split_sites(bundle, 3, scheme="dirichlet", alpha=0.3, seed=2)
    again = split_sites(bundle, 3, scheme="dirichlet", alpha=0.3, seed=2)
    assert [s.train.dataset_id for s in sites] == [s.train.dataset_id for s in again]
    assert sum(len(s.train) for s in sites) == 300
    assert sum(len(s.val) for s in sites if s.val is not None) == 100
    assert all(s.test is None for s in sites)
    all_train = np.concatenate([s.info["train_indices"] for s in sites])
    assert np.array_equal(np.sort(all_train), np.arange(300))
    for s in sites:
        tr = np.array(s.train.class_counts()) / len(s.train)
        if s.val is not None and len(s.val) >= 10:  # val mix follows the site's train mix
            va = np.array(s.val.class_counts()) / len(s.val)
            assert np.abs(tr - va).max() < 0.15
        np.testing.assert_array_equal(
            s.train.images.numpy(), bundle.train.images[s.info["train_indices"]].numpy())
    with pytest.raises(ConfigError):
        split_sites(bundle, 301)
