"""The audit tests train with ``num_threads=1`` (fit sets torch's threads); each module
gives the process its thread count back."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
