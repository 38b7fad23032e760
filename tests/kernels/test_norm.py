"""RMSNorm: Triton (CPU interpreter) vs torch.nn.functional.rms_norm, output and gradients."""

import pytest
import torch
import torch.nn.functional as F

from kernels import rms_norm
from kernels.testing import TOLERANCES, compare, poisoned_empty


@pytest.mark.parametrize("shape", [(2, 37, 24), (3, 19, 100), (70, 5)])  # odd rows; C a power of two or not
def test_rms_norm_triton_matches_torch(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (3.0 * torch.randn(shape, generator=gen)).requires_grad_()
    w = torch.randn(shape[-1], generator=gen).requires_grad_()
    x_ref, w_ref = (t.detach().clone().requires_grad_() for t in (x, w))
    with poisoned_empty():
        y = rms_norm(x, w, 1e-5, backend="triton")
        dy = torch.randn(y.shape, generator=gen)
        y.backward(dy)
    y_ref = F.rms_norm(x_ref, (shape[-1],), w_ref, 1e-5)
    y_ref.backward(dy)
    rtol, atol = TOLERANCES[torch.float32]
    recs = [compare("y", y, y_ref, rtol, atol), compare("x", x.grad, x_ref.grad, rtol, atol),
            compare("weight", w.grad, w_ref.grad, rtol, atol)]  # fmt: skip
    assert all(r["ok"] for r in recs), recs


def test_rms_norm_other_dtypes_and_bad_weight():
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    w = torch.randn(6, dtype=torch.bfloat16)
    # Not fp32: PyTorch's op (and its autograd node) on every backend.
    y = rms_norm(x.requires_grad_(), w, backend="triton")
    assert "NormFunction" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, F.rms_norm(x, (6,), w, 1e-5))
    with pytest.raises(ValueError, match="does not match the last dim"):
        rms_norm(x, torch.randn(5))


def test_rms_norm_auto_takes_triton_only_where_it_pays(monkeypatch):
    import kernels.ops as ops

    monkeypatch.setattr(ops, "resolve_backend", lambda backend, device: "triton")  # as on CUDA
    monkeypatch.setattr(ops, "_NORM_EAGER_MIN_NUMEL", 64)
    w = torch.ones(8, requires_grad=True)
    small = ops.rms_norm(torch.randn(7, 8, requires_grad=True), w)  # 56 elements: PyTorch's autograd node
    large = ops.rms_norm(torch.randn(9, 8, requires_grad=True), w)  # 72: the Triton backward
    assert "NormFunction" not in type(small.grad_fn).__name__
    assert "NormFunction" in type(large.grad_fn).__name__
    assert (
        "NormFunction"
        in type(ops.rms_norm(torch.randn(7, 8, requires_grad=True), w, backend="triton").grad_fn).__name__
    )
