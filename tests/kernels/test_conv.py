"""Per-order causal conv1d: Triton (CPU interpreter) vs the reference, output and gradients."""

import pytest
import torch

from kernels import causal_conv1d, causal_conv1d_ref
from kernels.testing import TOLERANCES, compare, make_orders, poisoned_empty


@pytest.mark.parametrize(
    "seqlen, hw, k, kx, width, has_bias, activation",
    [
        (37, (4, 9), 3, 3, 4, True, "silu"),
        (63, (7, 9), 2, 1, 4, False, "silu"),
        (35, (5, 7), 2, 2, 2, True, None),
        (29, None, 3, 1, 3, True, "silu"),  # no orders, and x a strided slice of a wider tensor (as the mixer's)
    ],
)
def test_conv_triton_matches_ref(seqlen, hw, k, kx, width, has_bias, activation):
    gen = torch.Generator().manual_seed(seqlen + width)
    x = torch.randn(2, seqlen, kx, 6, generator=gen)
    if hw is None:
        x = torch.randn(2, seqlen, kx, 10, generator=gen)[..., 2:8]
    w = torch.randn(k, 6, width, generator=gen)
    b = torch.randn(k, 6, generator=gen) if has_bias else None
    orders = make_orders(seqlen, hw, k, ("w2_flip", "v", "zh")) if hw is not None else None
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]  # keeps x's strides
    leaves_ref = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    with poisoned_empty():
        y = causal_conv1d(*leaves, orders=orders, activation=activation, backend="triton")
        dy = torch.randn(y.shape, generator=gen)
        y.backward(dy)
    y_ref = causal_conv1d_ref(*leaves_ref, orders=orders, activation=activation)
    y_ref.backward(dy)
    rtol, atol = TOLERANCES[torch.float32]
    recs = [compare("y", y, y_ref, rtol, atol)]
    for name, got, want in zip(("x", "weight", "bias"), leaves, leaves_ref):
        if got is not None:
            recs.append(compare(name, got.grad, want.grad, rtol, atol))
    assert all(r["ok"] for r in recs), recs


@pytest.mark.parametrize("span", [0, 1, 3, None])  # every step block, one, three, the per-call rule
def test_conv_backward_walks_any_span(span):
    from kernels.triton_conv import set_conv_config

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 37, 1, 12, generator=gen)  # 10 blocks of 4 steps, channels 8 + 4 (masked)
    w, b = torch.randn(3, 12, 4, generator=gen), torch.randn(3, 12, generator=gen)
    orders = make_orders(37, (4, 9), 3, ("w2_flip", "v", "h"))
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    leaves_ref = [t.clone().requires_grad_() for t in (x, w, b)]
    set_conv_config("bwd", (4, 8, 1) if span is None else (4, 8, 1, span))
    try:
        with poisoned_empty():
            y = causal_conv1d(*leaves, orders=orders, backend="triton")
            dy = torch.randn(y.shape, generator=gen)
            y.backward(dy)
    finally:
        set_conv_config("bwd", None)
    causal_conv1d_ref(*leaves_ref, orders=orders).backward(dy)
    rtol, atol = TOLERANCES[torch.float32]
    recs = [compare(n, a.grad, r.grad, rtol, atol) for n, a, r in zip(("x", "weight", "bias"), leaves, leaves_ref)]
    assert all(r["ok"] for r in recs), recs


@pytest.mark.parametrize("bsz, seqlen", [(0, 5), (2, 0)])
def test_conv_empty_batch_or_sequence(bsz, seqlen):
    x = torch.randn(bsz, seqlen, 1, 6, requires_grad=True)
    w, b = torch.randn(2, 6, 4, requires_grad=True), torch.randn(2, 6, requires_grad=True)
    y = causal_conv1d(x, w, b, backend="triton")
    y.backward(torch.ones_like(y))
    assert y.shape == (bsz, seqlen, 2, 6) and x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
