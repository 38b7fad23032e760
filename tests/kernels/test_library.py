"""torch.library registration: FLOP counting and torch.compile keeping the scan as one op."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kernels import causal_conv1d, selective_scan
from kernels.library import scan_flops
from kernels.testing import make_orders, make_scan_inputs


def _setup(seqlen=15, k=2, dim=4, n=4, **kw):
    inputs = make_scan_inputs(1, seqlen, k, dim, n, generator=torch.Generator().manual_seed(0), **kw)
    return inputs, make_orders(seqlen, (3, 5), k, ("h", "w2"))


def test_flop_counter_counts_the_scan():
    inputs, orders = _setup(has_z=False)
    bsz, seqlen, k, dim, n = 1, 15, 2, 4, 4
    with FlopCounterMode(display=False) as counter:
        selective_scan(**inputs, orders=orders, backend="triton")
    # FlopCounterMode's convention, two per multiply-add: twice VMamba's rule
    assert counter.get_total_flops() == 2 * (9 * bsz * seqlen * k * dim * n + bsz * seqlen * k * dim)
    assert scan_flops((bsz, seqlen, k, dim), (k, dim, n), True, True) == 9 * 480 + 2 * 120


def test_flop_counter_counts_the_gate_after_the_merge_per_order():
    """The registered gated merge counts its silu(z) as VMamba's rule counts the gate inside the scan: B·L·K·D (twice,
    in FlopCounterMode's convention)."""
    import kernels

    y, w, z = torch.randn(2, 7, 3, 5), torch.softmax(torch.randn(3), 0), torch.randn(2, 7, 5)
    with FlopCounterMode(display=False) as counter:
        kernels.branch_merge(y, w, z, backend="triton")
    assert counter.get_total_flops() == 2 * (2 * 7 * 3 * 5)
    with FlopCounterMode(display=False) as counter:
        kernels.branch_merge(y, w, backend="triton")
    assert counter.get_total_flops() == 0


def test_compile_keeps_one_scan_op_and_matches_eager():
    inputs, orders = _setup()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def fn(u, delta, A, B, C, D, z, delta_bias):
        y = selective_scan(u, delta, A, B, C, D, z, delta_bias, orders=orders, backend="triton")
        return causal_conv1d(y, torch.ones(2, 4, 4), orders=orders, backend="triton")

    compiled = torch.compile(fn, backend=capture, fullgraph=True)
    args = [inputs[n] for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    out = compiled(*args)
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert sum("scan_nas.selective_scan_fwd" in t for t in targets) == 1, targets
    assert sum("scan_nas.causal_conv1d_fwd" in t for t in targets) == 1, targets
    assert torch.allclose(out, fn(*args), rtol=0, atol=0)


def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs, orders = _setup()
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = {name: torch.empty_like(t) if t is not None else None for name, t in inputs.items()}
        y, states = torch.ops.scan_nas.selective_scan_fwd(
            fake["u"], fake["delta"], fake["A"], fake["B"], fake["C"], fake["D"], fake["z"], fake["delta_bias"],
            orders, True, torch.float32, True,
        )  # fmt: skip
    assert tuple(y.shape) == (1, 15, 2, 4) and y.dtype == torch.float32
    assert states.dim() == 4 and states.shape[0] == 2 and states.shape[2:] == (4, 4)


def test_registered_op_gradients_match_ref():
    inputs, orders = _setup(ku=1)
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    leaves_ref = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    y = selective_scan(**leaves, orders=orders, backend="triton")
    y_ref = selective_scan(**leaves_ref, orders=orders, backend="ref")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(dy)
    y_ref.backward(dy)
    for name in leaves:
        assert torch.allclose(leaves[name].grad, leaves_ref[name].grad, rtol=6e-4, atol=2e-3), name


@pytest.mark.parametrize("config", [None, (4, 4, 1, 8, 4, 1, 2, 0, 1), (4, 4, 1, 2, 4, 1, 4, 1, 1)],
                         ids=["tdn", "nd-onedecay", "nd-onegroup-prefetch"])  # fmt: skip
def test_recompute_states_keeps_no_states_and_gives_identical_gradients(monkeypatch, config):
    """recompute_states: the backward reruns the forward kernel, so the gradients are bit-identical while the
    chunk-start states (fp32, B·K · chunks · D · N) are no longer held between forward and backward."""
    import triton

    import kernels.triton_scan as ts

    if config is not None:
        monkeypatch.setattr(ts, "scan_config", lambda *args: config)
    inputs, orders = _setup(ku=1)
    dy = torch.randn(1, 15, 2, 4, generator=torch.Generator().manual_seed(1))
    grads, saved = {}, {}
    for recompute in (False, True):
        leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
        saved[recompute] = 0

        def pack(t, key=recompute):
            saved[key] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = selective_scan(**leaves, orders=orders, backend="triton", recompute_states=recompute)
        y.backward(dy)
        grads[recompute] = {n: t.grad for n, t in leaves.items()}
    for name in inputs:
        assert torch.equal(grads[True][name], grads[False][name]), name
    chunks = triton.cdiv(15, ts.scan_config(4, 4, 15, torch.device("cpu"))[0])
    assert saved[False] - saved[True] == 2 * chunks * 4 * 4 * 4  # B·K · chunks · D · N fp32


def test_recompute_states_with_some_inputs_requiring_grad():
    """Only A and B need gradients (a frozen model part): the recompute path still runs and matches."""
    inputs, orders = _setup()
    dy = torch.randn(1, 15, 2, 4, generator=torch.Generator().manual_seed(2))
    got = []
    for recompute in (False, True):
        leaves = {n: (t.clone().requires_grad_() if n in ("A", "B") else t) for n, t in inputs.items()}
        selective_scan(**leaves, orders=orders, backend="triton", recompute_states=recompute).backward(dy)
        got.append((leaves["A"].grad, leaves["B"].grad))
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])


def test_recompute_states_must_be_a_bool():
    inputs, orders = _setup()
    with pytest.raises(TypeError, match="recompute_states"):
        selective_scan(**inputs, orders=orders, backend="triton", recompute_states="false")


@pytest.mark.parametrize("direct", [True, False], ids=["eager", "registered"])
def test_backward_fills_no_zero_gradient_for_the_states(monkeypatch, direct):
    """The op's second output (the chunk states) never gets a gradient; autograd must not zero-fill one per step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    x = make_scan_inputs(1, 16, 2, 4, 1, ku=1, generator=torch.Generator().manual_seed(0))
    leaves = {k: (v.requires_grad_() if v is not None and v.is_floating_point() else v) for k, v in x.items()}
    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    if not direct:
        import kernels.library as lib

        monkeypatch.setattr(lib, "direct_eager", lambda: False)
    y = selective_scan(**leaves, orders=make_orders(16, (4, 4), 2), backend="triton")
    with Log():
        y.sum().backward()
    assert direct or any("selective_scan_bwd" in f for f in seen)  # the eager path calls the kernels directly
    assert not [f for f in seen if "zeros" in f or "fill" in f or "zero_" in f], seen
    assert all(v.grad is not None for v in leaves.values() if v is not None and v.requires_grad)


def test_fake_impls_match_the_kernels_on_strided_inputs():
    """torch.library.opcheck: the fake (meta) outputs must have the real outputs' shapes, dtypes AND strides. delta
    here is a permuted view, as the mixer's einsum makes it; an ``empty_like`` fake kept that layout and broke
    torch.compile (inductor asserted the wrong strides in the backward)."""
    inputs, orders = _setup(ku=1)
    delta = inputs["delta"].permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)  # (B, L, K, D) values, K-outer
    args = [inputs[n] for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    args[1] = delta
    _, states = torch.ops.scan_nas.selective_scan_fwd(*args, orders, True, None, True)
    dy = torch.randn(1, 15, 2, 4, generator=torch.Generator().manual_seed(3))
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.scan_nas.selective_scan_bwd, (dy, *args, orders, states, True), test_utils=tests)
    x = torch.randn(1, 15, 1, 8)[..., :4]  # a slice of a wider projection, as the mixer passes it
    conv_args = (x, torch.randn(2, 4, 3), torch.randn(2, 4), orders, True)
    torch.library.opcheck(torch.ops.scan_nas.causal_conv1d_bwd, (dy, *conv_args), test_utils=tests)


@pytest.mark.parametrize("config", [None, (4, 4, 1, 8, 4, 1, 2, 0, 1)], ids=["tdn", "nd"])
def test_states_only_forward_matches_the_full_one(monkeypatch, config):
    """store_y=False (the recompute backward's rerun): the same chunk states, no y."""
    import kernels.triton_scan as ts

    if config is not None:
        monkeypatch.setattr(ts, "scan_config", lambda *args: config)
    inputs, orders = _setup(ku=1)
    args = [inputs[n] for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    y, states = torch.ops.scan_nas.selective_scan_fwd(*args, orders, True, None, True)
    y0, states0 = torch.ops.scan_nas.selective_scan_fwd(*args, orders, True, None, True, False)
    assert y.shape == (1, 15, 2, 4) and y0.numel() == 0
    assert torch.equal(states, states0)


def test_eager_direct_path_matches_the_registered_ops(monkeypatch):
    """Plain eager calls run the implementations inside an autograd.Function, skipping the dispatcher; with the
    registered ops forced instead (as under torch.compile or a dispatch mode) outputs and gradients are identical."""
    import kernels
    import kernels.library as lib

    inputs, orders = _setup(ku=1)
    gen = torch.Generator().manual_seed(4)
    conv_w, conv_b = torch.randn(2, 4, 3, generator=gen), torch.randn(2, 4, generator=gen)
    merge_w = torch.softmax(torch.randn(2, generator=gen), 0)
    gate = [torch.ones(4), torch.zeros(4), torch.randn(2, 4, generator=gen), torch.zeros(2)]
    gate += [torch.randn(4, 2, generator=gen), torch.zeros(4)]
    gate_z = torch.randn(1, 15, 8, generator=gen)[..., 4:]  # (B, L, D) with row stride 2D, as the mixer's

    def step(recompute: bool):
        leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
        extra = [t.clone().requires_grad_() for t in (conv_w, conv_b, merge_w, *gate)]
        u = kernels.causal_conv1d(leaves["u"], extra[0], extra[1], orders=orders, backend="triton")
        scan_in = {**leaves, "u": u}
        y = selective_scan(**scan_in, orders=orders, backend="triton", recompute_states=recompute)
        gated = kernels.branch_attn_merge(y, extra[2], *extra[3:], backend="triton")
        plain = kernels.branch_merge(y, extra[2], backend="triton")
        fixed = kernels.branch_merge(y, merge_w, backend="triton")  # weights without a gradient
        z = gate_z.clone().requires_grad_()
        silu_gated = kernels.branch_merge(y, extra[2], z, backend="triton")  # Vim's gate after the merge
        silu_fixed = kernels.branch_merge(y, merge_w, z, backend="triton")
        out = gated + plain + fixed + silu_gated + silu_fixed
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)))
        paths = [type(t.grad_fn).__name__ for t in (u, y, gated, plain, fixed, silu_gated, silu_fixed)]
        return [paths, out] + [t.grad for t in (*leaves.values(), *extra, z)]

    for recompute in (False, True):
        direct = step(recompute)
        with monkeypatch.context() as m:
            m.setattr(lib, "direct_eager", lambda: False)
            registered = step(recompute)
        want = ["_ConvFunctionBackward", "_ScanFunctionBackward", "_AttnMergeFunctionBackward"]
        assert direct[0] == want + ["_MergeFunctionBackward"] * 2 + ["_GatedMergeFunctionBackward"] * 2, direct[0]
        assert not set(registered[0]) & set(direct[0]), registered[0]
        for a, b in zip(direct[1:], registered[1:]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("with_res", [True, False])
def test_add_rms_norm_registered_op_matches_the_direct_path(monkeypatch, with_res):
    """The fused add-norm through the dispatcher (as under torch.compile): opcheck of both ops (schema, fake outputs,
    autograd registration), and outputs and gradients identical to the eager autograd.Function's; r's gradient may be
    absent (the final norm)."""
    import kernels
    import kernels.library as lib

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 9, 12, generator=gen)
    x = x.bfloat16() if with_res else x  # without a residual, x is the (fp32) stream itself
    res = torch.randn(2, 9, 12, generator=gen) if with_res else None
    w = torch.randn(12, generator=gen)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    fwd_args = (
        x.requires_grad_(),
        res.requires_grad_() if with_res else None,
        w.requires_grad_(),
        1e-5,
        torch.bfloat16,
    )
    torch.library.opcheck(torch.ops.scan_nas.add_rms_norm, fwd_args, test_utils=tests)
    _, r = torch.ops.scan_nas.add_rms_norm(*fwd_args)
    dy = torch.randn(2, 9, 12, generator=gen).bfloat16()
    for dr in (torch.randn(2, 9, 12, generator=gen), None):
        bwd_args = (dy, dr, r.detach(), w.detach(), 1e-5, x.dtype, with_res)
        torch.library.opcheck(
            torch.ops.scan_nas.add_rms_norm_bwd, bwd_args, test_utils=("test_schema", "test_faketensor")
        )

    def step(use_r: bool):
        leaves = [t.detach().clone().requires_grad_() for t in (x, res, w) if t is not None]
        y, r = kernels.add_rms_norm(leaves[0], leaves[1] if with_res else None, leaves[-1], 1e-5, torch.bfloat16,
                                    backend="triton")  # fmt: skip
        loss = y.float().square().sum() + (r.sin().sum() if use_r else 0)
        loss.backward()
        return [type(y.grad_fn).__name__, y, r] + [t.grad for t in leaves]

    for use_r in (True, False):
        direct = step(use_r)
        with monkeypatch.context() as m:
            m.setattr(lib, "direct_eager", lambda: False)
            registered = step(use_r)
        assert direct[0] == "_AddNormFunctionBackward" and registered[0] != direct[0], (direct[0], registered[0])
        for a, b in zip(direct[1:], registered[1:]):
            assert torch.equal(a, b)
