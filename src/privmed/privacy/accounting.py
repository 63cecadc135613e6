"""Epsilon from DP-SGD histories, and noise calibration, on top of Opacus accountants.

A *history* is exactly Opacus's ``accountant.history``: a list of
``(noise_multiplier, sample_rate, steps)`` tuples. Entries compose (they are
never summed as epsilons), and composition does not depend on order, so
entries with the same ``(noise_multiplier, sample_rate)`` are merged before
accounting; that keeps the ledger cheap however many runs a dataset has seen.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import Domain

from privmed.errors import ConfigError

HistoryEntry = tuple[float, float, int]
History = list[HistoryEntry]

#: Opacus's orders plus larger ones: the minimum over more orders is still a valid
#: bound, identical to Opacus's whenever its optimum is interior, and tighter for
#: small epsilons (Opacus's default orders cannot go below ~0.1 at delta=1e-5).
RDP_ORDERS: list[float] = [*RDPAccountant.DEFAULT_ALPHAS, 80, 96, 128, 192, 256, 384, 512, 1024]

MAX_SIGMA = 1e6
MIN_SIGMA = 0.05
#: PRV discretisation error as a fraction of epsilon (Opacus uses a fixed 0.01,
#: which is 2% of epsilon 0.5 but needlessly fine, and slow, at epsilon 50).
PRV_REL_ERROR = 0.002
PRV_MIN_ERROR = 1e-3
#: Cap on the PRV grid (points), so ~10k steps or large epsilons stay fast.
PRV_MAX_GRID = 2**22
#: Above this (RDP) epsilon the PRV FFT overflows and the guarantee is void anyway.
PRV_MAX_EPSILON = 500.0
CALIBRATION_TOLERANCE = 0.01


# ---------------------------------------------------------------- history helpers

def normalize_history(history: Iterable[Sequence[float]]) -> History:
    """Validated copy of ``history`` as ``(float, float, int)`` tuples; raises ConfigError."""
    out: History = []
    for entry in history:
        try:
            sigma, q, steps = entry
            sigma, q = float(sigma), float(q)
            if float(steps) != int(steps):
                raise ValueError
            steps = int(steps)
        except (TypeError, ValueError):
            raise ConfigError(
                f"A privacy history entry must be (noise_multiplier, sample_rate, steps), "
                f"got {entry!r}.") from None
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ConfigError(f"A noise multiplier must be a non-negative number, got {sigma}.")
        if not 0 < q <= 1:
            raise ConfigError(f"A sample rate must lie in (0, 1], got {q}.")
        if steps < 0:
            raise ConfigError(f"A step count cannot be negative, got {steps}.")
        out.append((sigma, q, steps))
    return out


def _merged(history: History) -> tuple[HistoryEntry, ...]:
    """Entries with equal (sigma, q) merged, zero-step entries dropped, in a canonical order."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        if n:
            steps[(sigma, q)] = steps.get((sigma, q), 0) + n
    return tuple(sorted((s, q, n) for (s, q), n in steps.items()))


def merge_history(history: Iterable[Sequence[float]]) -> History:
    """Canonical form of ``history``: one entry per (sigma, q), same epsilon as the original."""
    return list(_merged(normalize_history(history)))


def history_union(*histories: Iterable[Sequence[float]]) -> History:
    """Per (sigma, q) the largest step count of any of ``histories``: a history that
    spends at least as much as each of them (for a reservation that may grow)."""
    steps: dict[tuple[float, float], int] = {}
    for history in histories:
        for s, q, n in _merged(normalize_history(history)):
            steps[(s, q)] = max(steps.get((s, q), 0), n)
    return sorted((s, q, n) for (s, q), n in steps.items())


def history_covers(big: Iterable[Sequence[float]], small: Iterable[Sequence[float]]) -> bool:
    """True when ``big`` has at least ``small``'s steps for every (sigma, q)."""
    have = {(s, q): n for s, q, n in _merged(normalize_history(big))}
    return all(have.get((s, q), 0) >= n for s, q, n in _merged(normalize_history(small)))


def history_to_json(history: Iterable[Sequence[float]]) -> list[dict]:
    return [{"noise_multiplier": s, "sample_rate": q, "steps": n}
            for s, q, n in normalize_history(history)]


def history_from_json(data: Iterable[dict]) -> History:
    try:
        entries = [(d["noise_multiplier"], d["sample_rate"], d["steps"]) for d in data]
    except (KeyError, TypeError):
        raise ConfigError("A privacy history must be a list of objects with keys "
                          "noise_multiplier, sample_rate and steps.") from None
    return normalize_history(entries)


def _check_accountant(name: str) -> None:
    if name not in ("prv", "rdp"):
        raise ConfigError(f"Unknown accountant '{name}': use 'prv' or 'rdp'.")


def _check_delta(delta: float) -> float:
    try:
        value = float(delta)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value < 1:
        raise ConfigError(f"Delta must lie strictly between 0 and 1, got {delta}.")
    return value


def make_accountant(name: str, history: Iterable[Sequence[float]] = ()) -> IAccountant:
    """A fresh Opacus accountant (``"prv"`` or ``"rdp"``) holding ``history``."""
    _check_accountant(name)
    accountant: IAccountant = PRVAccountant() if name == "prv" else RDPAccountant()
    accountant.history = normalize_history(history)
    return accountant


# ---------------------------------------------------------------- epsilon

@lru_cache(maxsize=1024)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    """RDP of one step at each of RDP_ORDERS; composition multiplies it by the steps."""
    return np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1,
                                               orders=RDP_ORDERS))


def _rdp_epsilon(history: Sequence[HistoryEntry], delta: float) -> float:
    """Same as Opacus's RDPAccountant.get_epsilon(delta, alphas=RDP_ORDERS), but cached."""
    rdp = sum(_rdp_per_step(s, q) * n for s, q, n in history)
    with warnings.catch_warnings():
        # "optimal order is the largest alpha": still a valid (looser) bound.
        warnings.simplefilter("ignore")
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(eps)


class _PRVAccountant(PRVAccountant):
    """Opacus's PRV accountant with its RDP-based domain bound served from our cache.

    ``_get_domain`` mirrors Opacus's ``PRVAccountant._get_domain`` and
    ``compute_safe_domain_size`` (remark 5.6 of Gopi et al.); were Opacus to
    rename the hook, its own (slower, equally correct) code would simply run.
    """

    def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error) -> Domain:
        total = sum(num_self_compositions)
        half_width = _half_width(self.history, eps_error, delta_error)
        mesh = eps_error / math.sqrt(total * math.log(12 / delta_error) / 2)
        return Domain.create_aligned(-half_width, half_width, mesh)


def _half_width(history: Sequence[HistoryEntry], eps_error: float, delta_error: float) -> float:
    total = sum(n for *_, n in history)
    width = _rdp_epsilon(history, delta_error / 4)
    for s, q, _ in history:
        width = max(width, _rdp_epsilon([(s, q, 1)], delta_error / (8 * total)))
    return max(width, eps_error) + 3


def _prv_epsilon(history: tuple[HistoryEntry, ...], delta: float, rel_error: float,
                 rough: float) -> float:
    """Opacus PRV upper bound with an error budget scaled to epsilon; inf if it fails."""
    delta_error = delta / 1000  # Opacus's default
    eps_error = max(PRV_MIN_ERROR, rel_error * rough)
    total = sum(n for _, _, n in history)
    # Opacus's grid spacing is eps_error / spread; widen the error if that grid is huge.
    spread = math.sqrt(total * math.log(12 / delta_error) / 2)
    half_width = _half_width(history, 0.0, delta_error)
    eps_error = max(eps_error, 2 * half_width * spread / PRV_MAX_GRID)
    accountant = _PRVAccountant()
    accountant.history = list(history)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # log(1 - q) at q = 1 is harmless there
        try:
            eps = float(accountant.get_epsilon(delta, eps_error=eps_error,
                                               delta_error=delta_error))
        except (ValueError, RuntimeError, FloatingPointError, MemoryError):
            return math.inf
    return eps if math.isfinite(eps) else math.inf


@lru_cache(maxsize=4096)
def _epsilon_cached(history: tuple[HistoryEntry, ...], delta: float, accountant: str,
                    rel_error: float) -> float:
    if not history:
        return 0.0
    if any(s == 0 for s, _, _ in history):
        return math.inf  # a noiseless step releases the data outright
    rough = _rdp_epsilon(history, delta)
    if accountant == "rdp" or rough > PRV_MAX_EPSILON:
        return rough
    # Both are valid (epsilon, delta) bounds, so the smaller one holds; PRV is
    # nearly always the smaller, RDP covers PRV's numerical failures.
    return max(0.0, min(_prv_epsilon(history, delta, rel_error, rough), rough))


def compute_epsilon(history: Iterable[Sequence[float]], delta: float,
                    accountant: str = "prv") -> float:
    """Epsilon spent by the composition of all entries of ``history`` (0.0 when empty).

    PRV results are Opacus's upper bound with an epsilon error of about 0.2% (at
    least 0.001) instead of Opacus's fixed 0.01, or the RDP bound where that is
    smaller (PRV fails numerically beyond epsilon ~500). RDP results use Opacus's
    orders extended to larger ones.
    """
    _check_accountant(accountant)
    delta = _check_delta(delta)
    return _epsilon_cached(_merged(normalize_history(history)), delta, accountant,
                           PRV_REL_ERROR)


# ---------------------------------------------------------------- calibration

def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float,
                               steps: int, accountant: str = "prv",
                               prefix: Iterable[Sequence[float]] = ()) -> float:
    """Smallest noise multiplier whose epsilon after ``steps`` is at most ``target_epsilon``.

    ``prefix``: mechanisms already planned on the same data (e.g. the federated
    normalisation statistics); the total, composed, reaches the target.
    The epsilon reached lies within 1% below the target. Solved by a safeguarded
    secant search on log(epsilon) against log(sigma), started from the RDP answer.
    """
    _check_accountant(accountant)
    delta = _check_delta(delta)
    try:
        target = float(target_epsilon)
    except (TypeError, ValueError):
        target = math.nan
    if not (math.isfinite(target) and target > 0):
        raise ConfigError(f"Epsilon must be a positive number, got {target_epsilon}.")
    ((_, sample_rate, steps),) = normalize_history([(1.0, sample_rate, steps)])
    if steps <= 0:
        raise ConfigError(f"Cannot calibrate noise for {steps} training steps.")
    before = tuple(normalize_history(prefix))
    if before and _epsilon_cached(before, delta, accountant, PRV_REL_ERROR) >= target:
        raise ConfigError(f"Epsilon {target:g} is already spent before training starts "
                          "(e.g. on normalisation statistics); raise epsilon.")
    return _calibrate(target, delta, sample_rate, steps, accountant, before)


@lru_cache(maxsize=256)
def _calibrate(target: float, delta: float, q: float, steps: int, accountant: str,
               prefix: tuple[HistoryEntry, ...] = ()) -> float:
    def eps(sigma: float) -> float:
        return _epsilon_cached(prefix + ((sigma, q, steps),), delta, accountant, PRV_REL_ERROR)

    if accountant == "rdp":
        return _solve(eps, target, 1.0, -2.0, delta, q, steps)
    # RDP is cheap and close: start PRV from RDP's answer and local slope.
    guess = _calibrate(target, delta, q, steps, "rdp", prefix)
    rdp = [_epsilon_cached(prefix + ((s, q, steps),), delta, "rdp", PRV_REL_ERROR)
           for s in (guess, guess * 1.05)]
    slope = (math.log(rdp[1]) - math.log(rdp[0])) / math.log(1.05) if min(rdp) > 0 else -2.0
    return _solve(eps, target, guess, slope, delta, q, steps)


def _solve(eps: Callable[[float], float], target: float, guess: float, slope: float,
           delta: float, q: float, steps: int) -> float:
    """Secant on log eps against log sigma (nearly linear), inside a shrinking bracket.

    ``lo`` has eps > target, ``hi`` has eps <= target; once both exist every
    guess stays strictly inside, with bisection when the secant misbehaves.
    """
    lower = target * (1 - CALIBRATION_TOLERANCE)
    aim = math.log(target * (1 - CALIBRATION_TOLERANCE / 2))
    lo: float | None = None
    hi: float | None = None
    x = math.log(min(max(guess, MIN_SIGMA), MAX_SIGMA))
    prev: tuple[float, float] | None = None
    for _ in range(100):
        e = eps(math.exp(x))
        if lower <= e <= target:
            return math.exp(x)
        if e > target:
            if x >= math.log(MAX_SIGMA):
                raise ConfigError(
                    f"Epsilon {target:g} at delta {delta:g} is out of reach for {steps} steps "
                    f"at sample rate {q:g}, even with noise multiplier {MAX_SIGMA:g}.")
            lo = x if lo is None else max(lo, x)
        else:
            if lo is None and x <= math.log(MIN_SIGMA):
                return MIN_SIGMA  # so loose a target that any noise at all meets it
            hi = x if hi is None else min(hi, x)
        if lo is not None and hi is not None and hi - lo < 1e-12:
            break
        y = math.log(e) if e > 0 else -700.0
        if prev is not None and x != prev[0]:
            slope = (y - prev[1]) / (x - prev[0])
        prev = (x, y)
        step = (aim - y) / slope if slope < 0 and math.isfinite(slope) else 1.0
        nxt = x + max(-2.0, min(2.0, step))  # at most a factor e^2 per move
        if lo is not None and hi is not None and not lo < nxt < hi:
            nxt = (lo + hi) / 2
        x = min(max(nxt, math.log(MIN_SIGMA)), math.log(MAX_SIGMA))
    if hi is None:
        raise ConfigError(f"Could not find a noise multiplier reaching epsilon {target:g}.")
    return math.exp(hi)  # eps <= target holds at hi


# ---------------------------------------------------------------- curves

def epsilon_curve(history: Iterable[Sequence[float]], delta: float, accountant: str = "prv",
                  points: int = 20) -> list[tuple[int, float]]:
    """``(steps taken, epsilon)`` pairs for plotting epsilon over training.

    Uses at most ``points`` evaluations at evenly spaced step counts (plus the
    entry boundaries when there are few entries), starting at (0, 0.0). Inner
    PRV points use a coarser 1% error, invisible on a plot; the last point equals
    :func:`compute_epsilon` of the whole history.
    """
    _check_accountant(accountant)
    delta = _check_delta(delta)
    hist = normalize_history(history)
    total = sum(n for _, _, n in hist)
    if total == 0:
        return [(0, 0.0)]
    points = max(2, int(points))
    marks = {int(round(v)) for v in np.linspace(0, total, points)}
    ends = np.cumsum([n for *_, n in hist]).tolist()
    if len(ends) <= points // 2:
        marks.update(ends)
    curve = []
    for mark in sorted(marks):
        prefix, left = [], mark
        for sigma, q, n in hist:
            if left <= 0:
                break
            prefix.append((sigma, q, min(n, left)))
            left -= n
        rel_error = PRV_REL_ERROR if mark == total else 5 * PRV_REL_ERROR
        curve.append((mark, _epsilon_cached(_merged(prefix), delta, accountant, rel_error)))
    return curve
