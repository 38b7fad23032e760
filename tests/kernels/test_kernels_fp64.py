"""fp64 runs on the reference (``auto`` picks it for fp64 inputs), so ``torch.autograd.gradcheck`` works; the Triton
and mamba-ssm kernels refuse fp64 in one line."""

from __future__ import annotations

import pytest
import torch

from kernels import branch_merge, causal_conv1d, resolve_backend, selective_scan
from kernels.testing import make_scan_inputs
from search_spaces import scan_order


def _orders(k: int, h: int, w: int) -> torch.Tensor:
    return torch.stack([scan_order(n, h, w) for n in ("h", "v_flip", "w2")[:k]])


@pytest.mark.parametrize("ku", [1, 2])
def test_scan_gradcheck_in_fp64(ku: int) -> None:
    inputs = make_scan_inputs(
        1, 6, 2, 3, 2, ku=ku, kz=1, dtype=torch.float64, generator=torch.Generator().manual_seed(4)
    )
    for name in ("A", "D", "delta_bias"):
        inputs[name] = inputs[name].double()
    names = list(inputs)
    leaves = [inputs[n].detach().requires_grad_() for n in names]
    orders = _orders(2, 2, 3)

    def scan(*ts):
        return selective_scan(**dict(zip(names, ts)), orders=orders)

    assert scan(*leaves).dtype == torch.float64
    assert torch.autograd.gradcheck(scan, leaves, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_conv_and_merge_gradcheck_in_fp64() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 6, 1, 3, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).requires_grad_()
    bias = torch.randn(2, 3, generator=gen, dtype=torch.float64).requires_grad_()
    orders = _orders(2, 2, 3)
    assert torch.autograd.gradcheck(lambda *t: causal_conv1d(*t, orders=orders), (x, weight, bias), eps=1e-6, atol=1e-6)
    y = torch.randn(1, 6, 2, 3, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.rand(2, generator=gen, dtype=torch.float64).requires_grad_()
    z = torch.randn(1, 6, 3, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(branch_merge, (y, w, z), eps=1e-6, atol=1e-6)


def test_auto_picks_the_reference_for_fp64_on_any_device() -> None:
    for device in ("cpu", "cuda"):
        assert resolve_backend("auto", torch.device(device), torch.float64) == "ref"
    assert resolve_backend("auto", torch.device("cuda"), None) == "triton"


@pytest.mark.parametrize("backend", ["triton", "mamba"])
def test_kernel_backends_refuse_fp64_in_one_line(backend: str) -> None:
    inputs = make_scan_inputs(1, 6, 2, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match=f"backend '{backend}' takes fp32, fp16 and bf16 inputs, got torch.float64: "
                                         "use backend 'ref'") as err:  # fmt: skip
        selective_scan(**inputs, backend=backend)
    assert "\n" not in str(err.value)
    fp32 = make_scan_inputs(1, 6, 2, 3, 2, generator=torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="got torch.float64: use backend 'ref'"):  # fp64 A alone: the same rule
        selective_scan(**{**fp32, "A": fp32["A"].double()}, backend=backend)
    with pytest.raises(ValueError, match="got torch.float64: use backend 'ref'"):
        causal_conv1d(inputs["u"], torch.randn(2, 3, 4, dtype=torch.float64), backend=backend)
