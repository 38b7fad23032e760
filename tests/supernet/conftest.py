"""Model tests run on one CPU thread: the models are tiny, and thread hand-offs on a shared CPU cost more than math."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
