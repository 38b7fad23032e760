"""The reference ops under a dispatch mode: one registered op each, counted by the Triton ops' FLOP rules, with the
plain reference's values and gradients."""

import importlib.util

import pytest
import timm
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import kernels
import supernet
from kernels.flop_rules import conv_flops, counter_flops, gate_flops, scan_flops
from kernels.testing import make_orders, make_scan_inputs


def _scan_case(gen, has_z=True, bias=True):
    inputs = make_scan_inputs(2, 13, 3, 5, 3, generator=gen, has_z=has_z)
    if not bias:
        inputs["delta_bias"] = None
    return inputs, make_orders(13, (1, 13), 3, ("h", "h_flip", "w2"))


def _grads(fn, tensors, dout=None):
    leaves = {
        k: v.detach().requires_grad_() if v is not None and v.is_floating_point() else v for k, v in tensors.items()
    }
    out = fn(**leaves)
    if dout is None:
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, out.dtype)
    want = {k: v for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    grads = torch.autograd.grad(out, list(want.values()), dout)
    return out.detach(), dict(zip(want, grads))


def _under_counter(fn, tensors):
    with FlopCounterMode(display=False) as counter:
        out, grads = _grads(fn, tensors)
    return out, grads, counter.get_flop_counts()["Global"]


@pytest.mark.parametrize("has_z,bias", [(True, True), (False, False)])
def test_scan_under_a_counter_is_one_counted_op_with_the_references_values(has_z, bias):
    inputs, orders = _scan_case(torch.Generator().manual_seed(1), has_z, bias)

    def fn(**t):
        return kernels.selective_scan(**t, orders=orders, backend="ref")

    want_out, want_grads = _grads(fn, inputs)
    out, grads, counts = _under_counter(fn, inputs)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    assert grads.keys() == want_grads.keys() and len(grads) == 7 + bias - (not has_z)
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-6, atol=1e-6, msg=name)
    rule = scan_flops(inputs["delta"].shape, inputs["A"].shape, True, has_z)
    assert dict(counts) == {torch.ops.scan_nas.selective_scan_counted: counter_flops(rule)}


def test_conv_and_gated_merge_under_a_counter():
    gen = torch.Generator().manual_seed(2)
    orders = make_orders(11, (1, 11), 2, ("h", "h_flip"))
    conv_in = {"x": torch.randn(2, 11, 1, 6, generator=gen), "weight": torch.randn(2, 6, 4, generator=gen),
               "bias": torch.randn(2, 6, generator=gen)}  # fmt: skip

    def conv(**t):
        return kernels.causal_conv1d(**t, orders=orders, backend="ref")

    want_out, want_grads = _grads(conv, conv_in)
    out, grads, counts = _under_counter(conv, conv_in)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    for name in ("x", "weight", "bias"):
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-6, atol=1e-6, msg=name)
    assert dict(counts) == {torch.ops.scan_nas.causal_conv1d_ref: counter_flops(conv_flops((2, 11), (2, 6, 4)))}

    merge_in = {"y": torch.randn(2, 11, 3, 6, generator=gen), "w": torch.softmax(torch.randn(3, generator=gen), 0),
                "z": torch.randn(2, 11, 6, generator=gen)}  # fmt: skip

    def merge(**t):
        return kernels.branch_merge(**t, backend="ref")

    want_out, want_grads = _grads(merge, merge_in)
    out, grads, counts = _under_counter(merge, merge_in)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    for name in ("y", "w", "z"):
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-6, atol=1e-6, msg=name)
    assert dict(counts) == {torch.ops.scan_nas.gated_branch_merge_ref: counter_flops(gate_flops((2, 11, 3, 6)))}


def test_the_backward_op_computes_only_the_gradients_asked_for():
    """The registered backward op gets which inputs need a gradient: those it computes as autograd of the reference
    would, the others it returns empty; under a counter only the inputs that require grad get one."""
    inputs, orders = _scan_case(torch.Generator().manual_seed(3))
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    dy = torch.randn(inputs["delta"].shape, generator=torch.Generator().manual_seed(8))
    _, want = _grads(lambda **t: kernels.selective_scan(**t, orders=orders, backend="ref"), inputs, dout=dy)
    needs = [True, False, True, False, False, True, False, True]
    tensors = [inputs[n] for n in names]
    got = torch.ops.scan_nas.selective_scan_counted_bwd(dy, *tensors, orders, True, None, "ref", needs)
    for name, need, g in zip(names, needs, got):
        if need:
            torch.testing.assert_close(g, want[name], rtol=1e-6, atol=1e-6, msg=name)
        else:
            assert g.numel() == 0, name
    u = inputs["u"].detach().requires_grad_()
    with FlopCounterMode(display=False) as counter:
        kernels.selective_scan(**{**inputs, "u": u}, orders=orders, backend="ref").backward(dy)
    assert set(counter.get_flop_counts()["Global"]) == {torch.ops.scan_nas.selective_scan_counted}
    torch.testing.assert_close(u.grad, want["u"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "name,backend",
    [("test_vim", "ref"), ("test_local_vim_search", "ref"), ("test_vmamba", "ref"), ("test_vmamba", "triton")],
)
def test_a_users_flop_counter_agrees_with_count_params_flops(name, backend):
    """FlopCounterMode's total, halved, is the published-convention count on the reference as on the Triton ops (the
    reference used to count the scan's per-step einsums and no conv or gate); fwd+bwd under the counter keeps the
    reference's gradients."""
    torch.manual_seed(0)
    model = timm.create_model(name, scan_backend=backend)
    size = model.pretrained_cfg["input_size"][1:]
    _, want = supernet.count_params_flops(model, size)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, *size))
    assert counter.get_total_flops() // 2 == want
    if backend == "ref":
        model.train()
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4))
        model(x).square().sum().backward()
        plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False):
            model(x).square().sum().backward()
        counted = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert counted.keys() == plain.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
        for n in plain:
            torch.testing.assert_close(counted[n], plain[n], rtol=1e-4, atol=1e-5, msg=n)


def test_a_model_trains_under_fake_tensors_and_a_counter_on_the_reference():
    """FakeTensorMode (shapes only) with a FlopCounterMode: forward and backward through the registered reference ops,
    every parameter gets a gradient, and the forward's count is the model's."""
    model = timm.create_model("test_vim", scan_backend="ref")
    size = model.pretrained_cfg["input_size"][1:]
    _, per_image = supernet.count_params_flops(model, size)
    model.eval()  # drop path and SLWS off: the forward is count_params_flops's, at batch 2
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, FlopCounterMode(display=False) as counter:
        out = model(mode.from_tensor(torch.randn(2, 3, *size)))
        forward_flops = counter.get_total_flops()
        out.sum().backward()
    assert tuple(out.shape) == (2, model.num_classes)
    assert forward_flops // 2 == 2 * per_image
    ops = set(counter.get_flop_counts()["Global"])
    assert {torch.ops.scan_nas.selective_scan_counted, torch.ops.scan_nas.causal_conv1d_ref} <= ops
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters() if p.requires_grad)


def test_every_op_counts_the_same_on_the_reference_and_on_triton():
    """Op by op on small odd shapes: the scan, the conv, the gated merge and LocalMamba's channel-gated merge (whose
    two linear layers the reference runs as matmuls and the Triton op reports by its formula)."""
    gen = torch.Generator().manual_seed(5)
    inputs, orders = _scan_case(gen)
    y, w, z = (
        torch.randn(2, 9, 3, 6, generator=gen),
        torch.softmax(torch.randn(3, generator=gen), 0),
        torch.randn(2, 9, 6),
    )
    attn = (torch.ones(6), torch.zeros(6), torch.randn(5, 6), torch.randn(5), torch.randn(6, 5), torch.randn(6))
    calls = {
        "scan": lambda b: kernels.selective_scan(**inputs, orders=orders, backend=b),
        "conv": lambda b: kernels.causal_conv1d(inputs["u"], torch.randn(3, 5, 4), orders=orders, backend=b),
        "gated merge": lambda b: kernels.branch_merge(y, w, z, backend=b),
        "plain merge": lambda b: kernels.branch_merge(y, w, backend=b),
        "attn merge": lambda b: kernels.branch_attn_merge(y, w, *attn, backend=b),
    }
    for name, call in calls.items():
        totals = []
        for backend in ("ref", "triton"):
            with FlopCounterMode(display=False) as counter:
                call(backend)
            totals.append(counter.get_total_flops())
        assert totals[0] == totals[1], name
        assert (totals[0] > 0) == (name != "plain merge"), name


@pytest.mark.parametrize("name", ["test_vim", "test_vmamba"])
def test_a_count_sees_the_projections_without_their_alignment_zeros(name):
    """The mixer pads x_proj/dt_proj with zeros to multiples of 8 for the GPU's GEMMs; a count sees the model's own
    x_proj (R + 2N outputs) and dt_proj (rank R), whatever padding the fast path would add."""
    from supernet.mixer import MultiOrderMixer

    model = timm.create_model(name, scan_backend="ref").eval()
    size = model.pretrained_cfg["input_size"][1:]
    mixers = [m for m in model.modules() if isinstance(m, MultiOrderMixer)]
    assert any(m.dt_rank % 8 or (m.dt_rank + 2 * m.d_state) % 8 for m in mixers)  # the case padding changes
    want = sum(
        2 * m.grid[0] * m.grid[1] * m.orders.shape[0] * m.d_inner * (2 * m.dt_rank + 2 * m.d_state) for m in mixers
    )
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, *size))
    assert counter.get_flop_counts()["Global"][torch.ops.aten.bmm] == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["vim_tiny", "local_vim_tiny_search", "vmamba_tiny"])
def test_a_flop_counter_on_the_gpu_agrees_with_the_cpu_count(name):
    """The published-size models on the GPU's Triton ops under bf16 autocast: the same count as on the CPU."""
    torch.manual_seed(0)
    model = timm.create_model(name)
    _, want = supernet.count_params_flops(model, 224)
    model = model.cuda().eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 224, 224, device="cuda"))
    assert counter.get_total_flops() // 2 == want


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("mamba_ssm") is None, reason="needs CUDA and mamba-ssm"
)
def test_the_mamba_backend_under_a_counter_counts_its_scan_and_keeps_its_values():
    """mamba-ssm's kernel is invisible to dispatch modes: under one it runs inside the registered scan op, counted by
    the rule, with the same output and gradients as without the mode."""
    inputs, orders = _scan_case(torch.Generator().manual_seed(6))
    inputs, orders = {k: v.cuda() if v is not None else None for k, v in inputs.items()}, orders.cuda()

    def fn(**t):
        return kernels.selective_scan(**t, orders=orders, backend="mamba")

    want_out, want_grads = _grads(fn, inputs)
    out, grads, counts = _under_counter(fn, inputs)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    assert grads.keys() == want_grads.keys()
    for name in grads:  # mamba-ssm sums some gradients with atomic adds: not bit-reproducible
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    rule = scan_flops(inputs["delta"].shape, inputs["A"].shape, True, True)
    assert dict(counts) == {torch.ops.scan_nas.selective_scan_counted: counter_flops(rule)}


def _scan_fp64(seed):
    inputs, orders = _scan_case(torch.Generator().manual_seed(seed))
    return {k: v.double() if v is not None else None for k, v in inputs.items()}, orders


def test_higher_derivatives_under_a_counter_are_the_references():
    """First and second derivatives (create_graph), forward-mode AD and batched gradients under a counter: the plain
    reference's values (the registered ops step aside for the last three), with the op's inputs depending on each
    other as in a mixer (delta built from u, one tensor as both B and C)."""
    inputs, orders = _scan_fp64(9)
    fwd_ad = torch.autograd.forward_ad

    def scan(u, bc):
        dependent = {"u": u, "delta": inputs["delta"] + 0.1 * u, "B": bc, "C": bc}
        return kernels.selective_scan(**{**inputs, **dependent}, orders=orders, backend="ref")

    def derivatives():
        u, bc = inputs["u"].clone().requires_grad_(), inputs["B"].clone().requires_grad_()
        du, dbc = torch.autograd.grad(scan(u, bc).square().sum(), [u, bc], create_graph=True)
        (ddu,) = torch.autograd.grad(du.square().sum() + dbc.square().sum(), [u])  # through the first backward
        with fwd_ad.dual_level():
            dual = fwd_ad.make_dual(inputs["u"], torch.ones_like(inputs["u"]))
            tangent = fwd_ad.unpack_dual(scan(dual, inputs["B"])).tangent
        y = scan(u, bc)
        batch = torch.stack([torch.ones_like(y), torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)])
        (batched,) = torch.autograd.grad(y, [u], batch, is_grads_batched=True)
        return du.detach(), dbc.detach(), ddu, tangent, batched

    plain = derivatives()
    with FlopCounterMode(display=False) as counter:
        counted = derivatives()
    assert torch.ops.scan_nas.selective_scan_counted in counter.get_flop_counts()["Global"]
    for name, a, b in zip(("du", "dB=dC", "double backward", "forward AD", "batched"), counted, plain):
        assert a is not None and b is not None, name
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_autocast_leaves_the_reference_scan_in_fp32():
    """CPU autocast does not lower the reference's state sums (the kernels keep them in fp32): the same output with and
    without it, plain or under a counter."""
    inputs, orders = _scan_case(torch.Generator().manual_seed(10))
    want = kernels.selective_scan(**inputs, orders=orders, backend="ref")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = kernels.selective_scan(**inputs, orders=orders, backend="ref")
        with FlopCounterMode(display=False) as counter:
            counted = kernels.selective_scan(**inputs, orders=orders, backend="ref")
    assert set(counter.get_flop_counts()["Global"]) == {torch.ops.scan_nas.selective_scan_counted}
    torch.testing.assert_close(plain, want, rtol=0, atol=0)
    torch.testing.assert_close(counted, want, rtol=0, atol=0)


def test_only_a_flop_counter_drops_the_projections_padding():
    """The mixer pads its projections for aligned GEMMs; a FlopCounterMode sees them unpadded, any other dispatch mode
    (selective activation checkpointing's, a logging mode) keeps the padding and its speed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    mixer = next(m for m in timm.create_model("test_vim").modules() if hasattr(m, "_padded_projections"))
    x_w, dt_w = torch.randn(2, mixer.dt_rank + 2 * mixer.d_state, 5), torch.randn(2, 5, mixer.dt_rank)
    padded = mixer._padded_projections(x_w, dt_w)[1].shape[-1]
    assert padded % 8 == 0 and padded > mixer.dt_rank
    with _PassThrough():
        assert mixer._padded_projections(x_w, dt_w)[1].shape[-1] == padded
    with FlopCounterMode(display=False):
        assert mixer._padded_projections(x_w, dt_w)[1].shape[-1] == mixer.dt_rank
