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


def _gate_input(y, seed):
    """z as the mixer passes it: the second half of the in-projection's output, a (B, L, D) view with row stride 2D."""
    gen = torch.Generator().manual_seed(seed)
    bsz, seqlen, _, dim = y.shape
    return torch.randn(bsz, seqlen, 2 * dim, generator=gen, dtype=y.dtype)[..., dim:]


@pytest.mark.parametrize("bsz, seqlen, k, dim, hidden, strided", CASES)
@pytest.mark.parametrize("learn_w", [True, False], ids=["dw", "fixed_w"])
def test_gated_merge_matches_ref(bsz, seqlen, k, dim, hidden, strided, learn_w):
    y, w, _, dout = _inputs(bsz, seqlen, k, dim, hidden, strided, seed=seqlen + k + 3)
    z = _gate_input(y, seed=dim)
    leaves = [y.detach().requires_grad_(), w.detach().requires_grad_(learn_w), z.detach().requires_grad_()]
    leaves_ref = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    with poisoned_empty():
        out = branch_merge(*leaves, backend="triton")
        out.backward(dout)
    out_ref = branch_merge_ref(*leaves_ref)
    out_ref.backward(dout.double())
    recs = [compare("out", out, out_ref, *FP32)]
    recs += [compare(n, a.grad, r.grad, *FP32) for n, a, r in zip("ywz", leaves, leaves_ref) if a.requires_grad]
    assert all(r["ok"] for r in recs), recs
    assert (leaves[1].grad is not None) == learn_w


@pytest.mark.parametrize("learn_w", [True, False], ids=["dw", "fixed_w"])
def test_gated_merge_takes_strided_weights(learn_w):
    """Weights that are a strided view (every other entry of a longer vector) reach both kernels as such."""
    y, _, _, dout = _inputs(2, 11, 3, 10, 1, False, seed=9)
    z = _gate_input(y, seed=10)
    base = torch.rand(6, generator=torch.Generator().manual_seed(11)).requires_grad_(learn_w)
    w = base[::2]
    out, grads = _run(lambda a, c: branch_merge(a, w, c, backend="triton"), [y, z], dout)
    out_ref, grads_ref = _run(lambda a, c: branch_merge_ref(a, w.detach(), c), [y, z], dout)
    recs = [compare("out", out, out_ref, *FP32)] + [compare(n, a, r, *FP32) for n, a, r in zip("yz", grads, grads_ref)]
    assert all(r["ok"] for r in recs), recs
    if learn_w:
        want = [(y * torch.nn.functional.silu(z).unsqueeze(2) * dout.unsqueeze(2)).sum((0, 1, 3))[i // 2] if i % 2 == 0
                else 0.0 for i in range(6)]  # fmt: skip
        torch.testing.assert_close(base.grad, torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_gate_after_the_merge_is_gating_every_order():
    """silu(z) ⊙ Σ_k w_k y_k equals Σ_k w_k (y_k ⊙ silu(z)): the mixer may gate once, after the merge."""
    y, w, _, _ = _inputs(2, 9, 3, 6, 1, False, seed=4)
    z = _gate_input(y, seed=5)
    y, w, z = y.double(), w.double(), z.double()
    gated_each = branch_merge_ref(y * torch.nn.functional.silu(z).unsqueeze(2), w)
    torch.testing.assert_close(branch_merge_ref(y, w, z), gated_each, rtol=1e-12, atol=1e-12)


def test_gated_merge_in_bf16_keeps_the_dtype():
    y, w, _, dout = _inputs(2, 19, 2, 24, 1, False, seed=6)
    y, dout = y.bfloat16(), dout.bfloat16()
    z = _gate_input(y, seed=7)
    out, grads = _run(lambda *a: branch_merge(*a, backend="triton"), [y, w, z], dout)
    out_ref, grads_ref = _run(branch_merge_ref, [y, w, z], dout)
    assert out.dtype == torch.bfloat16 and grads[0].dtype == grads[2].dtype == torch.bfloat16
    rtol, atol = TOLERANCES[torch.bfloat16]
    recs = [compare("out", out, out_ref, rtol, atol)]
    recs += [compare(n, a, r, rtol, atol) for n, a, r in zip("ywz", grads, grads_ref)]
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
    z = _gate_input(y, seed=3).requires_grad_()
    out = branch_merge(yl, w, z, backend="triton")
    assert not [t for t in out.grad_fn.saved_tensors if t is not None and t.shape == y.shape]  # gated: nor here
    out.backward(dout)
    assert w.grad is None and z.grad is not None


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "registered"])
def test_gated_merge_keeps_its_pre_gate_sum_only_for_a_backward(direct, monkeypatch):
    """Without a backward to follow (no_grad, or no input that requires grad) the gated merge writes no pre-gate sum;
    the output is the same either way."""
    import kernels.library as lib

    if not direct:
        monkeypatch.setattr(lib, "direct_eager", lambda: False)
    y, w, _, dout = _inputs(2, 9, 3, 11, 1, False, seed=4)
    z = _gate_input(y, seed=5)
    kept = []
    real = lib.gated_merge_fwd

    def spy(*args):
        out = real(*args)
        kept.append(out[1].numel())
        return out

    monkeypatch.setattr(lib, "gated_merge_fwd", spy)
    want = branch_merge_ref(y, w, z)
    with torch.no_grad():
        got_no_grad = branch_merge(y, w, z.requires_grad_(), backend="triton")
    got_no_input = branch_merge(y, w, z.detach(), backend="triton")
    zl = z.detach().requires_grad_()
    got_train = branch_merge(y, w, zl, backend="triton")
    assert kept == [0, 0, y.shape[0] * y.shape[1] * y.shape[3]]
    for got in (got_no_grad, got_no_input, got_train):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got_train.backward(dout)
    assert zl.grad is not None


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
    z = _gate_input(y, seed=8)
    for keep_pre in (True, False):
        torch.library.opcheck(torch.ops.scan_nas.gated_branch_merge, (y, w, z, keep_pre), test_utils=tests)
    pre = torch.ops.scan_nas.gated_branch_merge(y, w, z, True)[1]
    for y_or_shape, need_dw in ((y, True), (shape_only, False)):
        args = (dout, y_or_shape, w, z, pre, need_dw)
        torch.library.opcheck(torch.ops.scan_nas.gated_branch_merge_bwd, args, test_utils=tests)


def test_bad_shapes_are_one_line_errors():
    y = torch.randn(2, 5, 3, 8)
    with pytest.raises(ValueError, match=r"w: expected shape \(3\)"):
        branch_merge(y, torch.ones(4), backend="triton")
    with pytest.raises(ValueError, match=r"y: expected shape \(B, L, K, D\)"):
        branch_merge(y[0], torch.ones(3))
    with pytest.raises(ValueError, match=r"z: expected shape \(2, 5, 8\)"):
        branch_merge(y, torch.ones(3), torch.ones(2, 5, 3, 8), backend="triton")
    with pytest.raises(ValueError, match=r"fc2_weight: expected shape \(8, 2\)"):
        branch_attn_merge(y, torch.ones(3), torch.ones(8), torch.zeros(8), torch.ones(2, 8), torch.ones(2),
                          torch.ones(2, 8), torch.ones(8))  # fmt: skip
