"""The mixer's branch merge: Triton (CPU interpreter) vs the reference, output and every gradient."""

import pytest
import torch

from kernels import branch_attn_merge, branch_attn_merge_ref, branch_merge, branch_merge_ref
from kernels.testing import TOLERANCES, compare, poisoned_empty


def _inputs(bsz, seqlen, k, dim, hidden, strided, seed):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(bsz, seqlen, k, dim + 3 if strided else dim, generator=gen)
    if strided:
        y = y[..., 1 : dim + 1]  # unit stride along D, the other strides of a wider tensor
    params = [
        1.0 + 0.5 * torch.randn(dim, generator=gen),  # norm weight
        0.1 * torch.randn(dim, generator=gen),  # norm bias
        0.3 * torch.randn(hidden, dim, generator=gen),
        0.1 * torch.randn(hidden, generator=gen),
        0.3 * torch.randn(dim, hidden, generator=gen),
        0.1 * torch.randn(dim, generator=gen),
    ]
    w = torch.softmax(torch.randn(k, generator=gen), 0)
    dout = torch.randn(bsz, seqlen, dim, generator=gen)
    return y, w, params, dout


def _run(fn, tensors, dout):
    leaves = [t.detach().requires_grad_() for t in tensors]  # keeps y's strides
    out = fn(*leaves)
    out.backward(dout)
    return out, [t.grad for t in leaves]


# The kernels and the references both compute in fp32, so they agree far inside mamba-ssm's fp32 table; a tight bound
# keeps the small LayerNorm-mean term of dy (scaled by 1/L) visible.
FP32 = (1e-5, 1e-5)

# L 70 and 130 span several reduction programs (64 tokens each); D 150 spans two channel blocks of the merge.
CASES = [(2, 13, 3, 20, 5, False), (3, 130, 2, 37, 4, True), (1, 70, 1, 150, 3, False), (2, 9, 4, 7, 1, True)]


@pytest.mark.parametrize("bsz, seqlen, k, dim, hidden, strided", CASES)
def test_branch_attn_merge_matches_ref(bsz, seqlen, k, dim, hidden, strided):
    y, w, params, dout = _inputs(bsz, seqlen, k, dim, hidden, strided, seed=seqlen + dim)
    with poisoned_empty():
        out, grads = _run(lambda *a: branch_attn_merge(*a, backend="triton"), [y, w, *params], dout)
    out_ref, grads_ref = _run(branch_attn_merge_ref, [y, w, *params], dout)
    rtol, atol = FP32
    names = ("y", "w", "norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
    recs = [compare("out", out, out_ref, rtol, atol)]
    recs += [compare(n, g, r, rtol, atol) for n, g, r in zip(names, grads, grads_ref)]
    assert all(r["ok"] for r in recs), recs


@pytest.mark.parametrize("bsz, seqlen, k, dim, hidden, strided", CASES[:3])
def test_branch_merge_matches_ref(bsz, seqlen, k, dim, hidden, strided):
    y, w, _, dout = _inputs(bsz, seqlen, k, dim, hidden, strided, seed=seqlen)
    with poisoned_empty():
        out, grads = _run(lambda *a: branch_merge(*a, backend="triton"), [y, w], dout)
    out_ref, grads_ref = _run(branch_merge_ref, [y, w], dout)
    rtol, atol = FP32
    recs = [compare("out", out, out_ref, rtol, atol), compare("y", grads[0], grads_ref[0], rtol, atol)]
    recs.append(compare("w", grads[1], grads_ref[1], rtol, atol))
    assert all(r["ok"] for r in recs), recs


def test_merge_in_bf16_keeps_the_dtype_and_the_values():
    y, w, params, dout = _inputs(2, 21, 3, 24, 3, False, seed=5)
    y, dout = y.bfloat16(), dout.bfloat16()
    out, grads = _run(lambda *a: branch_attn_merge(*a, backend="triton"), [y, w, *params], dout)
    out_ref, grads_ref = _run(branch_attn_merge_ref, [y, w, *params], dout)
    assert out.dtype == grads[0].dtype == torch.bfloat16 and grads[2].dtype == torch.float32
    rtol, atol = TOLERANCES[torch.bfloat16]
    names = ("y", "w", "norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
    recs = [compare("out", out, out_ref, rtol, atol)]
    recs += [compare(n, g, r, rtol, atol) for n, g, r in zip(names, grads, grads_ref)]
    assert all(r["ok"] for r in recs), recs


@pytest.mark.parametrize("direct", [True, False], ids=["eager", "registered"])
def test_double_backward_raises(monkeypatch, direct):
    """The backward is not differentiable: a gradient of a gradient must fail, not come out of a partial graph."""
    import kernels.library as lib

    if not direct:
        monkeypatch.setattr(lib, "direct_eager", lambda: False)
    y, w, params, dout = _inputs(1, 6, 2, 5, 2, False, seed=2)
    leaves = [t.requires_grad_() for t in (y, w, *params)]
    out = branch_attn_merge(*leaves, backend="triton")
    (g_fc1,) = torch.autograd.grad((out * dout).sum(), leaves[4], create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g_fc1.pow(2).sum(), leaves[2])


def test_no_gradient_for_fixed_weights():
    y, w, _, dout = _inputs(1, 8, 2, 6, 1, False, seed=1)
    yl = y.requires_grad_()
    branch_merge(yl, w, backend="triton").backward(dout)  # w does not require grad: the dw reduction is skipped
    assert w.grad is None and yl.grad is not None
    assert torch.equal(yl.grad, (dout.unsqueeze(2) * w.view(1, 1, -1, 1)).expand_as(y))
    out = branch_merge(yl, w, backend="triton")
    assert not [t for t in out.grad_fn.saved_tensors if t is not None and t.shape == y.shape]  # y is not kept


def test_fake_impls_match_the_kernels():
    """torch.library.opcheck on a strided y: the fakes' shapes, dtypes and strides are the kernels'."""
    y, w, params, dout = _inputs(2, 11, 3, 10, 2, True, seed=7)
    tests = ("test_schema", "test_faketensor")
    norm_w, norm_b, fc1_w, fc1_b, fc2_w, fc2_b = params
    args = (y, w, norm_w, norm_b, 1e-5, fc1_w, fc1_b, fc2_w, fc2_b)
    torch.library.opcheck(torch.ops.scan_nas.branch_attn_merge, args, test_utils=tests)
    saved = torch.ops.scan_nas.branch_attn_merge(*args)[1:]
    bwd_args = (dout, y, w, *saved, *params)
    torch.library.opcheck(torch.ops.scan_nas.branch_attn_merge_bwd, bwd_args, test_utils=tests)
    torch.library.opcheck(torch.ops.scan_nas.branch_merge, (y, w), test_utils=tests)
    torch.library.opcheck(torch.ops.scan_nas.branch_merge_bwd, (dout, y, w, True), test_utils=tests)
    shape_only = dout.new_empty(()).expand(y.shape)  # the stand-in for y when the weights need no gradient
    torch.library.opcheck(torch.ops.scan_nas.branch_merge_bwd, (dout, shape_only, w, False), test_utils=tests)


def test_bad_shapes_are_one_line_errors():
    y = torch.randn(2, 5, 3, 8)
    with pytest.raises(ValueError, match=r"w: expected shape \(3\)"):
        branch_merge(y, torch.ones(4), backend="triton")
    with pytest.raises(ValueError, match=r"y: expected shape \(B, L, K, D\)"):
        branch_merge(y[0], torch.ones(3))
    with pytest.raises(ValueError, match=r"fc2_weight: expected shape \(8, 2\)"):
        branch_attn_merge(y, torch.ones(3), torch.ones(8), torch.zeros(8), torch.ones(2, 8), torch.ones(2),
                          torch.ones(2, 8), torch.ones(8))  # fmt: skip
