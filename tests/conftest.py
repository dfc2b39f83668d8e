"""Shared test fixtures."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def torch_threads():
    """At most 2 torch threads during the test (the official networks are large; stages set the
    thread count process-wide), restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, old))
    yield
    torch.set_num_threads(old)
