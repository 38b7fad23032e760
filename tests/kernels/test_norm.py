"""RMSNorm: Triton (CPU interpreter) vs torch.nn.functional.rms_norm, output and gradients."""

import pytest
import torch
import torch.nn.functional as F

import kernels
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


def _add_norm_torch(x, res, w, eps, out_dtype):
    r = x.double() if res is None else res.double() + x.double()
    return F.rms_norm(r, (r.shape[-1],), w.double(), eps).to(out_dtype), r


@pytest.mark.parametrize(
    "shape,x_dtype,out_dtype,with_res,r_used",
    [
        ((2, 37, 24), torch.float32, torch.float32, True, True),
        ((3, 19, 100), torch.bfloat16, torch.bfloat16, True, True),  # the block under autocast
        ((3, 19, 100), torch.bfloat16, torch.float32, True, False),  # the final norm: r used no further
        ((70, 5), torch.float32, torch.bfloat16, False, True),  # the first block: no residual yet
    ],
)
def test_add_rms_norm_triton_matches_torch(shape, x_dtype, out_dtype, with_res, r_used):
    """y = rms_norm(residual + x) in out_dtype, r = residual + x in fp32: values and every gradient against PyTorch in
    fp64, with the incoming gradient of r added to the norm's (or absent)."""
    gen = torch.Generator().manual_seed(sum(shape) + with_res)
    x = torch.randn(shape, generator=gen).to(x_dtype).requires_grad_()
    res = (3.0 * torch.randn(shape, generator=gen)).requires_grad_() if with_res else None
    w = torch.randn(shape[-1], generator=gen).requires_grad_()
    leaves = [t for t in (x, res, w) if t is not None]
    refs = [t.detach().clone().requires_grad_() for t in leaves]
    x_ref, res_ref, w_ref = refs[0], (refs[1] if with_res else None), refs[-1]
    with poisoned_empty():
        y, r = kernels.add_rms_norm(x, res, w, 1e-5, out_dtype, backend="triton")
    assert "AddNormFunction" in type(y.grad_fn).__name__
    assert y.dtype == out_dtype and r.dtype == torch.float32
    y_ref, r_ref = _add_norm_torch(x_ref, res_ref, w_ref, 1e-5, out_dtype)
    dy = torch.randn(shape, generator=gen).to(out_dtype)
    dr = torch.randn(shape, generator=gen) if r_used else None
    with poisoned_empty():
        torch.autograd.backward([y, r] if r_used else [y], [dy, dr] if r_used else [dy])
    torch.autograd.backward([y_ref, r_ref] if r_used else [y_ref], [dy, dr.double()] if r_used else [dy])
    recs = [compare("y", y, y_ref, *TOLERANCES[out_dtype]), compare("r", r, r_ref, *TOLERANCES[torch.float32])]
    for name, got, ref in zip(("x", "residual", "weight"), (x, res, w), (x_ref, res_ref, w_ref)):
        if got is not None:
            recs.append(compare(name, got.grad, ref.grad, *TOLERANCES[got.dtype]))
    assert all(rec["ok"] for rec in recs), recs


def test_add_rms_norm_fallback_and_bad_shapes(monkeypatch):
    import kernels.ops as ops

    w = torch.randn(6)
    x, res = torch.randn(2, 4, 6, requires_grad=True), torch.randn(2, 4, 6, dtype=torch.bfloat16)
    # A bf16 residual stream is PyTorch's composition on every backend, with the same values.
    y, r = kernels.add_rms_norm(x.bfloat16(), res, w, backend="triton")
    assert r.dtype == torch.bfloat16 and "AddNorm" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, F.rms_norm(res + x.bfloat16(), (6,), w, 1e-5).bfloat16())
    monkeypatch.setattr(ops, "resolve_backend", lambda backend, device: "triton")  # as on CUDA
    monkeypatch.setattr(ops, "_ADD_NORM_EAGER_MIN_NUMEL", 64)
    small, _ = ops.add_rms_norm(x, None, w)  # 48 elements in eager mode: PyTorch
    large, _ = ops.add_rms_norm(torch.randn(3, 4, 6, requires_grad=True), None, w)  # 72: Triton
    assert "AddNorm" not in type(small.grad_fn).__name__ and "AddNorm" in type(large.grad_fn).__name__
    with pytest.raises(ValueError, match="does not match the last dim"):
        kernels.add_rms_norm(x, None, torch.randn(5))
    with pytest.raises(ValueError, match="differ in shape"):
        kernels.add_rms_norm(x, torch.randn(2, 5, 6), w)
