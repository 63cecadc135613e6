"""What a per-image (ε, δ) guarantee means for a patient with several images.

DP-SGD protects one training record (an image). A patient with ``k`` images is a
group of ``k`` records, and the guarantee for the group follows by group privacy:
chaining the (ε, δ) inequality over the ``k`` neighbouring datasets between "with"
and "without" the patient gives

    P[M(D) ∈ S] ≤ e^{kε} P[M(D') ∈ S] + δ · (1 + e^ε + ... + e^{(k-1)ε}),

i.e. (kε, δ·(e^{kε} − 1)/(e^ε − 1))-DP: the exact sum of the chaining argument,
never above the textbook (kε, k·e^{(k-1)ε}·δ) (Dwork & Roth 2014, Theorem 2.2 and
the remark after it). Both are upper bounds that hold for any (ε, δ)-DP mechanism;
a patient-level accountant (issue 16) would give a much tighter figure.
"""

from __future__ import annotations

import math

from privmed.errors import ConfigError

#: Patient sizes the console and the report show by default.
GROUP_SIZES = (2, 5, 10)


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """The (ε, δ) an (``epsilon``, ``delta``)-DP release guarantees for ``k`` records
    together (one patient's ``k`` images). δ is capped at 1 (no guarantee left)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"A group has at least one record, got {k}.")
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ConfigError(f"Epsilon must be a non-negative number, got {epsilon}.")
    if not 0 <= delta <= 1:
        raise ConfigError(f"Delta must lie in [0, 1], got {delta}.")
    if epsilon == 0:
        factor = float(k)  # the geometric sum of k ones
    else:
        # (e^{kε} - 1)/(e^ε - 1) in logs: e^{kε} overflows a float for large kε.
        log_factor = k * epsilon + math.log(-math.expm1(-k * epsilon)) - math.log(
            math.expm1(epsilon))
        factor = math.exp(min(log_factor, 800.0))
    return k * epsilon, min(1.0, delta * factor)


def group_privacy_table(epsilon: float, delta: float,
                        sizes: tuple[int, ...] = GROUP_SIZES) -> list[dict]:
    """``[{"images": k, "epsilon": kε, "delta": δ_k}, ...]`` for each size in ``sizes``;
    ``delta`` 1 means the per-image guarantee says nothing about such a patient."""
    rows = []
    for k in sorted(set(sizes)):
        eps_k, delta_k = group_privacy(epsilon, delta, k)
        rows.append({"images": k, "epsilon": eps_k, "delta": delta_k})
    return rows
