"""Settings that are allowed but weaken a DP-SGD run more than a user would expect.

Each check returns one sentence for the console and the run's ``privacy.warnings``;
none of them refuses a run (``PrivacyConfig.resolved_delta`` refuses δ ≥ 1/N).
"""

from __future__ import annotations

from privmed.privacy.config import default_delta


def delta_warning(delta: float, n_train: int) -> str | None:
    """δ should be well below 1/N: a mechanism that publishes each record with probability
    δ is (0, δ)-DP and leaks about δ·N records. privmed's default is ≤ 1/(10 N)."""
    if delta <= 1.0 / (10.0 * n_train):
        return None
    return (f"δ = {delta:g} is not well below 1/N = {1.0 / n_train:.2g} for {n_train} "
            "training images: a release that shows each image outright with probability δ "
            f"meets this guarantee and would expose {delta * n_train:.2g} images on average; "
            "pass --delta at most "
            f"{default_delta(n_train):g} (the default).")


def full_batch_warning(n_train: int, batch_size: int) -> str | None:
    """With N ≤ B every Poisson step samples each image with probability 1: no
    amplification by subsampling, so the same ε needs much more noise per step."""
    if n_train > batch_size:
        return None
    return (f"Only {n_train} training images for --batch-size {batch_size}: every DP-SGD step "
            "uses all of them (sample rate q = 1), so there is no privacy amplification by "
            "subsampling and the same ε needs far more noise per step; pass a --batch-size "
            f"well below {n_train} (e.g. {max(1, n_train // 10)}) to sample a fraction of them "
            "per step.")


def dp_warnings(n_train: int, batch_size: int, delta: float) -> list[str]:
    """Every warning that applies to a central DP-SGD run, in the order to print them."""
    return [w for w in (full_batch_warning(n_train, batch_size),
                        delta_warning(delta, n_train)) if w]
