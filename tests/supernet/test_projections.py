"""The mixer's per-order projections: the one-node eager path against the plain ops torch.compile runs."""

from __future__ import annotations

import pytest
import torch

from supernet.mixer import _order_projections_ops, order_projections


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
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outs = fn(leaves[0].to(u_dtype), leaves[1], leaves[2], n)
    gen = torch.Generator().manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o, use in zip(outs, used) if use)
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
