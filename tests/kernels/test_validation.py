"""Input validation of the public ops: ValueError naming expected vs actual; the mamba backend's install hint."""

import importlib.util

import pytest
import torch

from kernels import causal_conv1d, selective_scan
from kernels.testing import make_scan_inputs


def _inputs():
    return make_scan_inputs(2, 10, 2, 4, 3, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "name, bad, pattern",
    [
        ("u", torch.randn(2, 10, 3, 4), r"u: expected shape \(2, 10, 1 or 2, 4\), got \(2, 10, 3, 4\)"),
        ("delta", torch.randn(2, 10, 4), r"delta: expected shape \(B, L, K, D\), got \(2, 10, 4\)"),
        ("A", torch.randn(2, 5, 3), r"A: expected shape \(2, 4, 3\), got \(2, 5, 3\)"),
        ("B", torch.randn(2, 11, 2, 3), r"B: expected shape \(2, 10, 2, 3\), got \(2, 11, 2, 3\)"),
        ("C", torch.randn(2, 10, 2, 4), r"C: expected shape \(2, 10, 2, 3\), got \(2, 10, 2, 4\)"),
        ("D", torch.randn(2, 5), r"D: expected shape \(2, 4\), got \(2, 5\)"),
        ("z", torch.randn(2, 10, 3, 4), r"z: expected shape \(2, 10, 1 or 2, 4\)"),
        ("delta_bias", torch.randn(3, 4), r"delta_bias: expected shape \(2, 4\), got \(3, 4\)"),
        (
            "A",
            -torch.rand(2, 4, 3, dtype=torch.float64),
            r"A: expected dtype in \['torch.float32'\], got torch.float64",
        ),
        ("u", torch.randint(0, 3, (2, 10, 2, 4)), r"u: expected dtype in .*got torch.int64"),
        ("D", torch.randn(2, 4, dtype=torch.bfloat16), r"D: expected dtype in \['torch.float32'\], got torch.bfloat16"),
        ("u", [1.0], r"u: expected a torch.Tensor, got list"),
    ],
)
def test_scan_rejects_bad_inputs(name, bad, pattern):
    inputs = _inputs()
    inputs[name] = bad
    with pytest.raises(ValueError, match=pattern):
        selective_scan(**inputs, backend="triton")


def test_scan_rejects_bad_orders_and_backend():
    inputs = _inputs()
    with pytest.raises(ValueError, match=r"orders: expected shape \(2, 10\), got \(2, 9\)"):
        selective_scan(**inputs, orders=torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"orders: expected an int32/int64 tensor"):
        selective_scan(**inputs, orders=torch.zeros(2, 10))
    not_perm = torch.stack([torch.arange(10), torch.zeros(10, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"orders: rows \[1\] are not permutations of 0..9"):
        selective_scan(**inputs, orders=not_perm, check_orders=True)
    with pytest.raises(ValueError, match=r"unknown scan backend 'cuda'; expected one of auto, ref, triton, mamba"):
        selective_scan(**inputs, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_scan_rejects_mixed_devices():
    inputs = _inputs()
    inputs["u"] = inputs["u"].cuda()
    with pytest.raises(ValueError, match=r"delta: expected device cuda:0 \(the device of u\), got cpu"):
        selective_scan(**inputs, backend="triton")


def test_conv_rejects_bad_inputs():
    x, w = torch.randn(2, 10, 2, 4), torch.randn(2, 4, 4)
    with pytest.raises(ValueError, match=r"weight: expected shape \(K, D, W\), got \(2, 4\)"):
        causal_conv1d(x, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"x: expected shape \(B, L, 1 or 2, 4\), got \(2, 10, 3, 4\)"):
        causal_conv1d(torch.randn(2, 10, 3, 4), w)
    with pytest.raises(ValueError, match=r"bias: expected shape \(2, 4\), got \(4,\)"):
        causal_conv1d(x, w, torch.randn(4))
    with pytest.raises(ValueError, match=r"activation: expected 'silu' or None, got 'relu'"):
        causal_conv1d(x, w, activation="relu")


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is not None, reason="mamba-ssm is installed")
def test_mamba_backend_names_the_install_command():
    with pytest.raises(ImportError, match=r"pip install \.\[cuda\]"):
        selective_scan(**_inputs(), backend="mamba")


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("mamba_ssm") is None, reason="needs CUDA and mamba-ssm"
)
def test_mamba_backend_matches_ref():
    from kernels.testing import TOLERANCES, compare, make_orders

    inputs = make_scan_inputs(2, 63, 2, 8, 16, device="cuda")
    orders = make_orders(63, (7, 9), 2).cuda()
    y = selective_scan(**inputs, orders=orders, backend="mamba")
    y_ref = selective_scan(**inputs, orders=orders, backend="ref")
    assert compare("y", y, y_ref, *TOLERANCES[torch.float32])["ok"]


def test_mamba_anchor_du_bound_widens_with_k_only_for_shared_low_precision_input():
    from kernels.check_gpu import mamba_grad_tolerance
    from kernels.testing import grad_tolerance

    for dtype in (torch.bfloat16, torch.float16):
        rtol, atol = grad_tolerance("u", dtype)
        assert mamba_grad_tolerance("u", dtype, 8, 1) == (rtol, 8 * atol)
        assert mamba_grad_tolerance("u", dtype, 8, 8) == (rtol, atol)  # per-order input: nothing is summed
        assert mamba_grad_tolerance("delta", dtype, 8, 1) == grad_tolerance("delta", dtype)
    assert mamba_grad_tolerance("u", torch.float32, 8, 1) == grad_tolerance("u", torch.float32)
