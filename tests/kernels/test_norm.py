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


def _layer_norm_case(shape, x_dtype, affine, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (3.0 * torch.randn(shape, generator=gen) + 1.0).to(x_dtype)
    c = shape[-1]
    w = torch.randn(c, generator=gen) if affine[0] else None
    b = torch.randn(c, generator=gen) if affine[1] else None
    dy = torch.randn(shape, generator=gen)
    return x, w, b, dy


@pytest.mark.parametrize("shape", [(2, 37, 24), (3, 19, 100), (70, 5), (17, 96)])  # odd rows; C 2^k or not
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, False)])
def test_layer_norm_triton_matches_torch(shape, x_dtype, affine):
    # Against an fp64 layer_norm of the same (rounded) inputs: fp32 out, gradients of x (in x's dtype), weight, bias.
    x, w, b, dy = _layer_norm_case(shape, x_dtype, affine, sum(shape))
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    refs = [t.double().requires_grad_() if t is not None else None for t in (x, w, b)]
    with poisoned_empty():
        y = kernels.layer_norm(*leaves, 1e-5, torch.float32, backend="triton")
        y.backward(dy)
    y_ref = F.layer_norm(refs[0], (shape[-1],), refs[1], refs[2], 1e-5)
    y_ref.backward(dy.double())
    assert y.dtype == torch.float32 and leaves[0].grad.dtype == x_dtype
    rtol, atol = TOLERANCES[torch.float32]
    recs = [compare("y", y, y_ref, rtol, atol)]
    for name, got, ref in zip(("x", "weight", "bias"), leaves, refs):
        if got is not None:
            tol = TOLERANCES[x_dtype] if name == "x" else (rtol, atol)
            recs.append(compare(name, got.grad, ref.grad, *tol))
    assert all(r["ok"] for r in recs), recs


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_writes_the_dtype_asked_for(out_dtype):
    # The fp32 result rounded once (what autocast's fp32 LayerNorm and the next GEMM's cast give): within one unit in
    # the last place of out_dtype (the CPU interpreter's rounding is not PyTorch's round-to-nearest-even).
    x, w, b, _ = _layer_norm_case((5, 33, 48), torch.float32, (True, True), 3)
    y = kernels.layer_norm(x, w, b, 1e-5, out_dtype, backend="triton")
    assert y.dtype == out_dtype
    ulp = torch.finfo(out_dtype).eps  # one unit in the last place at 1.0
    torch.testing.assert_close(y.float(), F.layer_norm(x, (48,), w, b, 1e-5), rtol=ulp, atol=1e-6)


def test_layer_norm_frozen_affine_and_fallbacks(monkeypatch):
    import kernels.ops as ops

    x, w, b, dy = _layer_norm_case((9, 16), torch.float32, (True, True), 4)
    # Parameters that do not learn: no dweight/dbias partials, x's gradient as with them.
    xa = x.clone().requires_grad_()
    kernels.layer_norm(xa, w, b, backend="triton").backward(dy)
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    kernels.layer_norm(xb, wb, b, backend="triton").backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)
    assert wb.grad is not None
    # auto: PyTorch below the eager threshold, the Triton op above it (as on CUDA); fp64 always PyTorch.
    monkeypatch.setattr(ops, "resolve_backend", lambda backend, device: "triton")
    monkeypatch.setattr(ops, "_NORM_EAGER_MIN_NUMEL", 100)
    wg = w.clone().requires_grad_()
    ours = "_LayerNormFunction"
    assert ours not in type(ops.layer_norm(torch.randn(9, 8), wg[:8], None).grad_fn).__name__
    assert ours in type(ops.layer_norm(torch.randn(9, 16), wg, None).grad_fn).__name__
    y64 = ops.layer_norm(x.double(), wg.double(), None, backend="triton")
    assert y64.dtype == torch.float64 and ours not in type(y64.grad_fn).__name__
    with pytest.raises(ValueError, match="does not match the last dim"):
        kernels.layer_norm(x, torch.randn(5), None)
    # Rows wider than a tile holds: PyTorch's norm (a Triton tile of 16 such rows would not fit).
    monkeypatch.setattr(ops, "_NORM_MAX_C", 8)
    assert ours not in type(ops.layer_norm(torch.randn(9, 16), wg, None).grad_fn).__name__
    assert "NormFunction" not in type(ops.rms_norm(torch.randn(9, 16, requires_grad=True), wg).grad_fn).__name__


def test_layer_norm_output_can_be_modified_in_place():
    # As nn.LayerNorm's: the result is a tensor of x's shape, not a view made inside the autograd Function.
    x, w, b, dy = _layer_norm_case((3, 5, 8), torch.float32, (True, True), 6)
    xl = x.clone().requires_grad_()
    y = kernels.layer_norm(xl, w, b, backend="triton")
    assert y._base is None
    y.mul_(2.0).backward(dy)
    torch.testing.assert_close(
        xl.grad, 2.0 * torch.autograd.grad(F.layer_norm(x.requires_grad_(), (8,), w, b), x, dy)[0]
    )


def test_layer_norm_registered_op_matches_the_direct_path(monkeypatch):
    """Through the dispatcher (torch.compile's path): opcheck of both ops, and the same outputs and gradients as the
    eager autograd.Function, with and without affine parameters."""
    import kernels.library as lib

    x, w, b, dy = _layer_norm_case((3, 11, 20), torch.bfloat16, (True, True), 5)
    fwd_args = (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(), 1e-5, torch.float32)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.scan_nas.layer_norm, fwd_args, test_utils=tests)
    for need_wb in (True, False):
        torch.library.opcheck(torch.ops.scan_nas.layer_norm_bwd, (dy, x, w, 1e-5, need_wb),
                              test_utils=("test_schema", "test_faketensor"))  # fmt: skip

    def step(weight, bias):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
        y = kernels.layer_norm(*leaves, 1e-5, torch.float32, backend="triton")
        y.backward(dy)
        return [type(y.grad_fn).__name__, y] + [t.grad for t in leaves if t is not None]

    for weight, bias in ((w, b), (None, None)):
        direct = step(weight, bias)
        with monkeypatch.context() as m:
            m.setattr(lib, "direct_eager", lambda: False)
            registered = step(weight, bias)
        assert direct[0] == "_LayerNormFunctionBackward" and direct[0] != registered[0], (direct[0], registered[0])
        for a, r in zip(direct[1:], registered[1:]):
            assert torch.equal(a, r)
