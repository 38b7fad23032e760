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
            r"backend 'triton' takes fp32, fp16 and bf16 inputs, got torch.float64: use backend 'ref'",
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
    with pytest.raises(ValueError, match=r"weight: expected shape \(K, D, W\) with W >= 1, got \(2, 4\)"):
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


def test_anchor_bound_passes_only_within_twice_the_anchor_error():
    from kernels.check_gpu import anchor_bound
    from kernels.testing import compare

    truth = {"y": torch.zeros(5, dtype=torch.float64)}
    anchor = {"y": torch.full((5,), 1.0)}
    for ours_err, want in ((1.5, True), (3.0, False), (float("nan"), False)):
        ours = {"y": torch.full((5,), ours_err)}
        recs = [compare("y", ours["y"], truth["y"], 1e-3, 1e-3)]
        assert not recs[0]["ok"]  # outside the table
        anchor_bound(recs, ours, anchor, truth)
        assert recs[0]["ok"] is want and recs[0]["ok_table"] is False and recs[0]["anchor_max_abs_err"] == 1.0
    recs = [compare("y", torch.full((5,), 3.0), truth["y"], 1e-3, 1e-3)]
    anchor_bound(recs, {"y": torch.full((5,), 3.0)}, {"y": torch.full((5,), float("inf"))}, truth)
    assert not recs[0]["ok"]  # an anchor that blew up vouches for nothing


def test_block_size_files_load_or_fail_in_one_line(tmp_path):
    import json
    import subprocess
    import sys

    from kernels.triton_scan import load_scan_configs, scan_config, set_scan_config

    good = tmp_path / "sizes.json"
    capped = [8, 32, 1, 32, 32, 1, 1, 1, 1, 0, 96]
    good.write_text(json.dumps([{"N": 16, "L": 197, "config": [4, 32, 1, 4, 32, 1, 2, 0, 1]},
                                {"N": 1, "L": 3136, "config": capped}]))  # fmt: skip
    try:
        load_scan_configs(str(good))
        assert scan_config(384, 16, 197, torch.device("cuda")) == (4, 32, 1, 4, 32, 1, 2, 0, 1)
        assert scan_config(96, 1, 3136, torch.device("cuda")) == tuple(capped)
    finally:
        set_scan_config(16, 197, None)
        set_scan_config(1, 3136, None)
    (tmp_path / "bad.json").write_text(json.dumps([{"N": 16, "config": [1, 2]}]))
    (tmp_path / "short.json").write_text(json.dumps([{"N": 16, "L": 9, "config": [1, 2]}]))
    (tmp_path / "cap.json").write_text(json.dumps([{"N": 1, "L": 9, "config": [*capped[:10], 300]}]))
    for name, pattern in (("missing.json", "not found"), ("bad.json", "not a block-size file"),
                          ("short.json", "3 or 7 to 12 numbers"), ("cap.json", "register cap")):  # fmt: skip
        with pytest.raises(ValueError, match=pattern):
            load_scan_configs(str(tmp_path / name))
    proc = subprocess.run([sys.executable, "-m", "kernels.check_gpu", "--configs", str(tmp_path / "missing.json")],
                          capture_output=True, text=True)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: --configs: block-size file")


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("bad", [10, -1, 10**8])
def test_orders_out_of_range_are_refused_before_any_kernel(backend, bad):
    """An index outside [0, L) made the Triton kernels read and write outside the tensors (garbage, a crash); on the
    host it is refused in one line for the scan and the conv on both backends."""
    inputs = _inputs()
    orders = torch.stack([torch.arange(10), torch.arange(10).flip(0)])
    orders[0, 3] = bad
    for dtype in (torch.int64, torch.int32):
        with pytest.raises(ValueError, match=rf"orders: token indices must lie in \[0, 10\).* {bad}"):
            selective_scan(**inputs, orders=orders.to(dtype), backend=backend)
        with pytest.raises(ValueError, match=rf"orders: token indices must lie in \[0, 10\).* {bad}"):
            causal_conv1d(inputs["u"], torch.randn(2, 4, 3), orders=orders.to(dtype), backend=backend)
    dup = torch.stack([torch.arange(10), torch.zeros(10, dtype=torch.long)])  # in range, not a permutation
    with pytest.raises(ValueError, match=r"orders: rows \[1\] are not permutations"):
        causal_conv1d(inputs["u"], torch.randn(2, 4, 3), orders=dup, check_orders=True, backend=backend)


def test_other_ops_name_a_bad_input():
    from kernels import add_rms_norm, branch_attn_merge, branch_merge, gather_rows, layer_norm, rms_norm

    y, w = torch.randn(2, 5, 2, 4), torch.rand(2)
    cases = [
        (lambda: causal_conv1d(torch.randint(0, 3, (2, 5, 1, 4)), torch.randn(2, 4, 3)), r"x: expected a floating"),
        (lambda: causal_conv1d([[1.0]], torch.randn(2, 4, 3)), r"x: expected a torch.Tensor, got list"),
        (lambda: causal_conv1d(torch.randn(2, 5, 1, 4), torch.randn(2, 4, 0)), r"with W >= 1, got \(2, 4, 0\)"),
        (lambda: causal_conv1d(torch.randn(2, 5, 1, 4), torch.randn(2, 4, 3, device="meta")), r"weight: expected dev"),
        (lambda: branch_merge(y.long(), w), r"y: expected a floating-point tensor, got torch.int64"),
        (lambda: branch_merge(y, [0.5, 0.5]), r"w: expected a torch.Tensor, got list"),
        (
            lambda: branch_merge(y, w, torch.randn(2, 5, 4, device="meta")),
            r"z: expected device cpu \(the device of y\), got meta",
        ),
        (lambda: gather_rows(torch.tensor([1]), torch.randn(3, 4)), r"tensors: expected a list of tensors"),
        (
            lambda: rms_norm(torch.randn(3, 4), torch.ones(4, device="meta")),
            r"weight: expected device cpu \(the device of x\), got meta",
        ),
        (lambda: add_rms_norm(torch.randn(3, 4), torch.randn(3, 4).long(), torch.ones(4)), r"residual: expected a fl"),
        (lambda: layer_norm(torch.randn(3, 4), torch.ones(4), [0.0] * 4), r"bias: expected a torch.Tensor"),
        (
            lambda: branch_attn_merge(
                y[:, :0], w, *[torch.ones(4)] * 2, torch.ones(3, 4), torch.ones(3), torch.ones(4, 3), torch.ones(4)
            ),  # fmt: skip
            r"y: the sequence is empty",
        ),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()
    inputs = _inputs()
    for k in ("u", "delta", "B", "C", "z"):
        inputs[k] = inputs[k][:, :0]
    with pytest.raises(ValueError, match=r"delta: the sequence is empty \(L = 0"):
        selective_scan(**inputs, backend="ref")
