"""The mixer's per-order projections: the one-node eager path against the plain ops torch.compile runs."""

from __future__ import annotations

import pytest
import torch

from supernet.mixer import _order_projections_ops, order_projections


def _inputs(ku: int, k: int = 3, dim: int = 20, n: int = 5, rank_p: int = 8, pad: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(2, 7, ku, dim, generator=gen)
    x_w = torch.randn(k, rank_p + 2 * n + pad, dim, generator=gen) / dim**0.5
    dt_w = torch.randn(k, dim, rank_p, generator=gen) / rank_p**0.5
    return u, x_w, dt_w, n


def _run(fn, u, x_w, dt_w, n, used, autocast):
    leaves = [t.detach().clone().requires_grad_() for t in (u, x_w, dt_w)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outs = fn(*leaves, n)
    gen = torch.Generator().manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o, use in zip(outs, used) if use)
    # autograd.grad returns the gradients as computed (a leaf's .grad would be re-laid out like the leaf)
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, leaves, allow_unused=True))


@pytest.mark.parametrize("ku", [1, 3])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("used", [(True, True, True), (False, True, True), (True, False, True)])
def test_one_node_path_matches_the_ops(ku: int, autocast: bool, used: tuple[bool, ...]) -> None:
    u, x_w, dt_w, n = _inputs(ku)
    outs, grads = _run(order_projections, u, x_w, dt_w, n, used, autocast)
    ref_outs, ref_grads = _run(_order_projections_ops, u, x_w, dt_w, n, used, autocast)
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    for o, r in zip(outs, ref_outs):
        assert o.dtype == r.dtype and o.shape == r.shape
        torch.testing.assert_close(o, r, **tol)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)  # dt_proj gets no gradient when delta is unused
        if r is not None:
            assert g.dtype == r.dtype and g.shape == r.shape
            torch.testing.assert_close(g, r, **tol)


def test_u_gradient_comes_back_in_u_layout() -> None:
    # The point of the one-node path: u's gradient is (B, L, K, D)-contiguous like u, so autograd's sum with the
    # scan's gradient is a plain contiguous add (the ops path gives an order-major, strided one).
    u, x_w, dt_w, n = _inputs(3)
    _, grads = _run(order_projections, u, x_w, dt_w, n, (True, True, True), False)
    assert grads[0].is_contiguous()
    _, ref = _run(_order_projections_ops, u, x_w, dt_w, n, (True, True, True), False)
    assert not ref[0].is_contiguous()
