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
