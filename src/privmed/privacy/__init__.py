"""Differential privacy: settings, epsilon accounting and the per-dataset budget ledger."""

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

__all__ = [
    "DEFAULT_EPSILON",
    "BudgetLedger",
    "PrivacyConfig",
    "Reservation",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "default_delta",
    "epsilon_curve",
    "history_from_json",
    "history_to_json",
    "make_accountant",
]
