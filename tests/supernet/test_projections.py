"""The mixer's per-order projections: the one-node eager path against the plain ops torch.compile runs."""

from __future__ import annotations

import pytest
import torch

from supernet.mixer import _order_projections_ops, _row_splits, _split_tokens, _weight_grad, order_projections


def _inputs(ku: int, k: int = 3, dim: int = 20, n: int = 5, rank_p: int = 8, pad: int = 3, strided: bool = False):
    gen = torch.Generator().manual_seed(0)
    if strided:  # the VMamba path: u = xin.unsqueeze(2) with xin channel-first after its 2-D conv
        u = torch.randn(2, dim, 7, generator=gen).transpose(1, 2).unsqueeze(2)
        assert not u.is_contiguous()
    else:
        u = torch.randn(2, 7, ku, dim, generator=gen)
    x_w = torch.randn(k, rank_p + 2 * n + pad, dim, generator=gen) / dim**0.5
    dt_w = torch.randn(k, dim, rank_p, generator=gen) / rank_p**0.5
    return u, x_w, dt_w, n


def _run(fn, u, x_w, dt_w, n, used, autocast, u_dtype=torch.float32, frozen=()):
    leaves = [t.detach().clone().requires_grad_(i not in frozen) for i, t in enumerate((u, x_w, dt_w))]
    with torch.autocast(u.device.type, dtype=torch.bfloat16, enabled=autocast):
        outs = fn(leaves[0].to(u_dtype), leaves[1], leaves[2], n)
    gen = torch.Generator().manual_seed(1)
    loss = sum(
        (o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o, use in zip(outs, used) if use
    )
    # autograd.grad returns the gradients as computed (a leaf's .grad would be re-laid out like the leaf)
    wrt = [t for i, t in enumerate(leaves) if i not in frozen]
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, wrt, allow_unused=True))


def _assert_same(got, want, tol):
    outs, grads = got
    ref_outs, ref_grads = want
    for o, r in zip(outs, ref_outs):
        assert o.dtype == r.dtype and o.shape == r.shape
        torch.testing.assert_close(o, r, **tol)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)  # dt_proj gets no gradient when delta is unused
        if r is not None:
            assert g.dtype == r.dtype and g.shape == r.shape
            torch.testing.assert_close(g, r, **tol)


@pytest.mark.parametrize("ku", [1, 3])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("used", [(True, True, True), (False, True, True), (True, False, True), (True, True, False)])
def test_one_node_path_matches_the_ops(ku: int, autocast: bool, used: tuple[bool, ...]) -> None:
    u, x_w, dt_w, n = _inputs(ku)
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    _assert_same(_run(order_projections, u, x_w, dt_w, n, used, autocast),
                 _run(_order_projections_ops, u, x_w, dt_w, n, used, autocast), tol)  # fmt: skip


@pytest.mark.parametrize(
    "case", ["strided-u", "one-order", "fp16-u", "frozen-weights", "frozen-u"]
)  # fmt: skip
def test_one_node_path_matches_the_ops_in_odd_cases(case: str) -> None:
    u, x_w, dt_w, n = _inputs(1, k=1 if case == "one-order" else 3, strided=case == "strided-u")
    u_dtype = torch.float16 if case == "fp16-u" else torch.float32
    frozen = {"frozen-weights": (1, 2), "frozen-u": (0,)}.get(case, ())
    fp16 = case == "fp16-u"  # fp16 u against fp32 weights: only autocast makes the plain ops' GEMMs agree on a dtype
    tol = dict(rtol=2e-2, atol=2e-2) if fp16 else dict(rtol=1e-5, atol=1e-5)
    args = (u, x_w, dt_w, n, (True, True, True), fp16, u_dtype, frozen)
    _assert_same(_run(order_projections, *args), _run(_order_projections_ops, *args), tol)


def test_u_gradient_comes_back_in_u_layout() -> None:
    # The point of the one-node path: u's gradient is (B, L, K, D)-contiguous like u, so autograd's sum with the
    # scan's gradient is a plain contiguous add.
    u, x_w, dt_w, n = _inputs(3)
    _, grads = _run(order_projections, u, x_w, dt_w, n, (True, True, True), False)
    assert grads[0].is_contiguous()


def test_torch_func_transforms_take_the_plain_ops() -> None:
    # torch.func cannot trace an autograd.Function without setup_context; the projections fall back to plain ops.
    u, x_w, dt_w, n = _inputs(3)

    def loss(w):
        return sum(o.square().sum() for o in order_projections(u, w, dt_w, n))

    got = torch.func.grad(loss)(x_w)
    want = torch.autograd.grad(
        sum(o.square().sum() for o in _order_projections_ops(u, x_w.requires_grad_(), dt_w, n)), x_w
    )[0]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("rows", [1, 21, 14, 48, 160])
@pytest.mark.parametrize("groups", [1, 3, 8])
def test_weight_grad_sums_every_token_once(rows: int, groups: int) -> None:
    # Split into interleaved token slices (16, 2 or none of them here, by rows' divisors) and summed back.
    gen = torch.Generator().manual_seed(rows * 10 + groups)
    a = torch.randn(rows, groups, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(rows, groups, 7, generator=gen, dtype=torch.float64)
    want = torch.einsum("rgp,rgq->gpq", a, b)
    got = _weight_grad(a, b)
    assert got.dtype == torch.float64 and got.shape == (groups, 5, 7)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert _row_splits(rows, groups) in {s for s in (1, 2, 4, 8, 16) if rows % s == 0}


def test_weight_grad_of_half_operands_accumulates_in_fp32() -> None:
    # bf16 operands: the sum over 4,096 tokens in fp32, not a bf16 GEMM output (1e-3 relative) cast to fp32.
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(4096, 2, 6, generator=gen).bfloat16()
    b = torch.randn(4096, 2, 9, generator=gen).bfloat16()
    want = torch.einsum("rgp,rgq->gpq", a.double(), b.double())
    got = _weight_grad(a, b)
    assert got.dtype == torch.float32
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5


def test_token_slices_are_views_of_the_projection_buffers() -> None:
    # The layouts the one-node backward splits: x_proj's output gradient (rows, K, C) and the saved Δ-rank columns of
    # x_proj's token-major output (a column slice). A copy would cost what the split saves.
    buf = torch.randn(48, 3, 20)
    for t in (buf, buf[..., :8]):
        view = _split_tokens(t, 16)
        assert view.shape == (16 * 3, 3, t.shape[-1])
        assert view.data_ptr() == t.data_ptr() and view._base is not None
        torch.testing.assert_close(view[5 * 3 + 2], t[5::16, 2])  # slice 5 of group 2: rows 5, 21, 37


@pytest.mark.parametrize("shape", [(3, 16), (3, 7), (1, 5)])
def test_one_node_path_matches_the_ops_at_split_sizes(shape: tuple[int, int]) -> None:
    # B·L tokens of 48 (16 slices), 21 (none) and 5 (none), with a per-order and a shared u.
    for ku in (1, 3):
        u, x_w, dt_w, n = _inputs(ku)
        u = torch.randn(*shape, ku, u.shape[-1], generator=torch.Generator().manual_seed(7))
        tol = dict(rtol=1e-5, atol=1e-5)
        _assert_same(_run(order_projections, u, x_w, dt_w, n, (True, True, True), False),
                     _run(_order_projections_ops, u, x_w, dt_w, n, (True, True, True), False), tol)  # fmt: skip


def test_one_node_outputs_are_token_major() -> None:
    # x_proj's output is one (B·L, K, C) buffer on the one-node path (per-order u too), so the backward's split of the
    # saved Δ-rank columns is a view; B and C are its column slices: order stride C, token stride K·C.
    u, x_w, dt_w, n = _inputs(3)
    with torch.no_grad():
        _, b, c = order_projections(u, x_w, dt_w, n)
    k, width = x_w.shape[:2]
    for t in (b, c):
        assert t.stride()[1:] == (k * width, width, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bmm with an fp32 out_dtype)")
def test_cuda_weight_grad_of_bf16_operands_accumulates_in_fp32() -> None:
    # Vim-Ti's x_proj weight gradient at 128 × 197 tokens: fp32 sums of the bf16 operands (the GEMM's out_dtype).
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(128 * 197, 2, 48, generator=gen).bfloat16().cuda()
    b = torch.randn(128 * 197, 2, 384, generator=gen).bfloat16().cuda()
    want = torch.einsum("rgp,rgq->gpq", a.double(), b.double())
    got = _weight_grad(a, b)
    assert got.dtype == torch.float32
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("ku", [1, 4])
def test_cuda_one_node_path_matches_the_ops(ku: int) -> None:
    # Vim-Ti widths, 2 × 200 tokens, bf16 autocast on the GPU: the two paths agree to bf16 rounding.
    gen = torch.Generator().manual_seed(11)
    u = torch.randn(2, 200, ku, 384, generator=gen)
    x_w = torch.randn(4, 48, 384, generator=gen) / 384**0.5
    dt_w = torch.randn(4, 384, 16, generator=gen) / 4
    args = [t.cuda() for t in (u, x_w, dt_w)]
    tol = dict(rtol=2e-2, atol=2e-2)
    _assert_same(_run(order_projections, *args, 16, (True, True, True), True),
                 _run(_order_projections_ops, *args, 16, (True, True, True), True), tol)  # fmt: skip
    # and the plain-ops path (torch.compile's) against autograd's own GEMM backward
    _assert_same(_run(_order_projections_ops, *args, 16, (True, True, True), True),
                 _run(_plain_autograd_ops, *args, 16, (True, True, True), True), tol)  # fmt: skip


def _plain_autograd_ops(u, x_w, dt_w, n):
    """The reference: the same GEMMs with autograd's own backward (one small-output GEMM per weight gradient)."""
    from supernet.mixer import _order_major, _project

    _, delta, b, c = _project(u, x_w, dt_w, n)
    return tuple(_order_major(t, *u.shape[:2]) for t in (delta, b, c))


@pytest.mark.parametrize("ku", [1, 3])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("used", [(True, True, True), (False, True, True), (True, True, False)])
def test_ops_path_gradients_match_plain_autograd(ku: int, autocast: bool, used: tuple[bool, ...]) -> None:
    """The plain-ops path (what torch.compile traces) takes its weight gradients from the token-sliced fp32 sums:
    the same values and dtypes as autograd's GEMM backward, with and without autocast, at a token count that splits."""
    u, x_w, dt_w, n = _inputs(ku, k=3, dim=24)
    u = torch.randn(4, 12, ku, 24, generator=torch.Generator().manual_seed(2))  # 48 tokens: 16-way slices
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    _assert_same(_run(_order_projections_ops, u, x_w, dt_w, n, used, autocast),
                 _run(_plain_autograd_ops, u, x_w, dt_w, n, used, autocast), tol)  # fmt: skip


def test_ops_path_weight_gradients_are_the_token_sliced_sums(monkeypatch) -> None:
    """The plain-ops path's weight gradients come from _weight_grad (both GEMMs), and it traces as one graph."""
    import supernet.mixer as mixer

    u, x_w, dt_w, n = _inputs(3)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_order_projections_ops)(u, x_w.requires_grad_(), dt_w.requires_grad_(), n)
    assert explained.graph_break_count == 0
    calls = []
    real = mixer._weight_grad
    monkeypatch.setattr(mixer, "_weight_grad", lambda a, b: calls.append(a.shape) or real(a, b))
    _run(_order_projections_ops, u, x_w, dt_w, n, (True, True, True), False)
    assert len(calls) == 2  # x_proj's and dt_proj's
