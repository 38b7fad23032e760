"""Shared pytest setup: Triton kernels on the CPU interpreter when no GPU is present; one CPU thread per test."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before the first ``import triton`` so that @triton.jit kernels run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    import interpreter_speedups

    interpreter_speedups.install()  # the same kernels' results, sooner (see the module)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared CPU: thread hand-offs cost more than the math."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
