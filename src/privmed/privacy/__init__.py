"""Differential privacy: settings, epsilon accounting, the per-dataset budget ledger and the
cryptographically secure sampler of every DP noise and Poisson sample."""

from privmed.privacy.accounting import (
    calibrate_noise_multiplier,
    compute_epsilon,
    epsilon_curve,
    history_from_json,
    history_to_json,
    make_accountant,
)
from privmed.privacy.config import DEFAULT_EPSILON, PrivacyConfig, default_delta
from privmed.privacy.ledger import BudgetLedger, Reservation
from privmed.privacy.noise import SecureRandom
from privmed.privacy.records import PrivacyRecords

__all__ = [
    "DEFAULT_EPSILON",
    "BudgetLedger",
    "PrivacyConfig",
    "PrivacyRecords",
    "Reservation",
    "SecureRandom",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "default_delta",
    "epsilon_curve",
    "history_from_json",
    "history_to_json",
    "make_accountant",
]
