"""Fixtures of the federation tests; their building blocks are in tests/federation_kit.py."""

from __future__ import annotations

import pytest

from privmed.data import make_synthetic


@pytest.fixture(scope="module")
def bundle(request):
    """The module's synthetic X-rays: ``make_synthetic(**SYNTHETIC)``, its own sizes and
    seed, made once per module."""
    return make_synthetic(**request.module.SYNTHETIC)
