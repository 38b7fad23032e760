"""Supernets and derived children: arch parameters, mixing modes, exact orders, weight slicing, backends."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import yaml
from supernet_testutils import build, example_arch

import kernels
import supernet
from search_spaces import ArchSpec, load_space, save_arch, scan_order
from supernet.mixer import MultiOrderMixer

SEARCH = ["test_local_vim_search", "test_local_vmamba_search"]


class ScanSpy:
    """Wraps ``kernels.selective_scan`` and records the K and orders of every call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[int, torch.Tensor]] = []
        self.recompute: list[bool] = []
        real = kernels.selective_scan

        def spy(u, delta, *args, **kwargs):
            self.calls.append((delta.shape[2], kwargs["orders"].clone()))
            self.recompute.append(kwargs.get("recompute_states", False))
            return real(u, delta, *args, **kwargs)

        monkeypatch.setattr(kernels, "selective_scan", spy)


def _arch_dict(model_name: str, labels: list[str], per_layer: list[list[str]]) -> dict:
    space = load_space("localmamba")
    return {
        "format_version": 1,
        "model": model_name,
        "space": space.to_dict(),
        "layers": [{"label": lab, "orders": o} for lab, o in zip(labels, per_layer)],
    }


@pytest.mark.parametrize("name", SEARCH)
def test_arch_weight_partition_and_probs(name: str) -> None:
    model = build(name, img_size=16)
    arch, weights = model.arch_parameters(), model.weight_parameters()
    ids_a, ids_w = {id(p) for p in arch}, {id(p) for p in weights}
    assert not ids_a & ids_w and ids_a | ids_w == {id(p) for p in model.parameters()}
    labels = model.arch_labels()
    assert len(arch) == len(labels) and all(p.shape == (8,) for p in arch)
    assert all(p.abs().max() < 0.01 for p in arch)  # 1e-3·randn init
    probs = model.arch_probs()
    assert list(probs) == labels
    for p in probs.values():
        assert p.dtype == torch.float32 and p.device.type == "cpu" and not p.requires_grad
        torch.testing.assert_close(p.sum(), torch.tensor(1.0))
    assert model.search_space.candidates == load_space("localmamba").candidates
    assert model.derived_model_name == name.removesuffix("_search")


def test_labels_are_stable() -> None:
    assert build("test_local_vim_search").arch_labels() == ["blocks.0", "blocks.1"]
    assert build("test_local_vmamba_search").arch_labels() == [f"stages.{s}.blocks.0" for s in range(4)]


@pytest.mark.parametrize("name", ["test_vim", "test_local_vim", "test_vmamba"])
def test_non_search_models_have_no_arch_parameters(name: str) -> None:
    model = build(name, img_size=16)
    assert model.arch_parameters() == [] and model.arch_probs() == {}
    assert len(model.weight_parameters()) == len(list(model.parameters()))
    with pytest.raises(RuntimeError, match="fixed orders"):
        model.set_arch_mode("hard")


def test_set_arch_mode_validation() -> None:
    model = build("test_local_vim_search", img_size=16)
    with pytest.raises(ValueError, match="arch mode must be one of"):
        model.set_arch_mode("darts")
    with pytest.raises(ValueError, match="top_m"):
        model.set_arch_mode("hard", top_m=9)
    with pytest.raises(ValueError, match="tau"):
        model.set_arch_mode("gumbel", tau=0.0)


@pytest.mark.parametrize("name", SEARCH)
@pytest.mark.parametrize("top_m", [1, 3])
def test_hard_mode_computes_only_sampled_orders(name: str, top_m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = build(name, img_size=16)
    model.set_arch_mode("hard", tau=1.0, top_m=top_m)
    spy = ScanSpy(monkeypatch)
    model.train()
    y = model(torch.randn(2, 3, 16, 16))
    assert len(spy.calls) == len(model.arch_labels())
    assert all(k == top_m for k, _ in spy.calls)
    for (_, orders), (_, mixer) in zip(spy.calls, model.named_mixers()):
        rows = {tuple(r.tolist()) for r in orders}
        assert rows <= {tuple(r.tolist()) for r in mixer.orders}
    y.sum().backward()
    # straight-through: every layer's logits get a gradient although only top_m orders ran
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.arch_parameters())
    # the unsampled orders' parameters get none (they were not computed)
    mixer = model.named_mixers()[0][1]
    assert (mixer.x_proj_weight.grad.flatten(1).abs().sum(1) > 0).sum() == top_m


@pytest.mark.parametrize("family", ["vim", "vmamba"])
def test_scan_recompute_defaults_and_override(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Search models recompute their scan states when they scan every candidate, keep them for a sampled path;
    baselines keep them; the kwarg overrides both."""
    cases = [
        (f"test_local_{family}_search", {}, None, True),
        (f"test_local_{family}_search", {"mix": "gumbel"}, None, True),
        (f"test_local_{family}_search", {}, "hard", False),
        (f"test_local_{family}_search", {"scan_recompute": False}, None, False),
        (f"test_{family}", {}, None, False),
        (f"test_{family}", {"scan_recompute": True}, None, True),
    ]
    for name, kwargs, mode, expected in cases:
        model = build(name, img_size=16, **kwargs).train()
        if mode:
            model.set_arch_mode(mode, tau=1.0, top_m=1)
        spy = ScanSpy(monkeypatch)
        model(torch.randn(1, 3, 16, 16))
        assert spy.recompute and all(r is expected for r in spy.recompute), (name, kwargs, mode, spy.recompute)
    # hard sampling of every candidate (top-m = K) scans the whole supernet, so it recomputes too
    model = build(f"test_local_{family}_search", img_size=16).train()
    model.set_arch_mode("hard", tau=1.0, top_m=8)
    spy = ScanSpy(monkeypatch)
    model(torch.randn(1, 3, 16, 16))
    assert all(spy.recompute), spy.recompute
    with pytest.raises(TypeError, match="scan_recompute"):
        build(f"test_{family}", img_size=16, scan_recompute="false")


def test_hard_and_gumbel_sampling_is_reproducible_from_the_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("test_local_vim_search", img_size=16).train()
    x = torch.randn(2, 3, 16, 16)
    for mode in ("hard", "gumbel"):
        model.set_arch_mode(mode, tau=0.5, top_m=2)
        torch.manual_seed(3)
        state = torch.get_rng_state()
        y1 = model(x)
        torch.set_rng_state(state)
        y2 = model(x)
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    model.eval()  # no sampling in eval: hard → top-m of the logits, gumbel → softmax
    state = torch.get_rng_state()
    model(x)
    assert torch.equal(state, torch.get_rng_state())


def test_gumbel_computes_every_order(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("test_local_vmamba_search", img_size=16, mix="gumbel").train()
    spy = ScanSpy(monkeypatch)
    model(torch.randn(1, 3, 16, 16)).sum().backward()
    assert all(k == 8 for k, _ in spy.calls)
    assert all(p.grad.abs().sum() > 0 for p in model.arch_parameters())


@pytest.mark.parametrize("family", ["vim", "vmamba"])
def test_derived_child_uses_exactly_the_arch_orders(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = build(f"test_local_{family}_search").arch_labels()
    choices = [["h", "v_flip", "w2", "w7_flip"], ["h_flip", "v", "w2_flip", "w7"], ["v", "v_flip", "w2", "w7"]]
    per_layer = [choices[i % 3] for i in range(len(labels))]
    arch = _arch_dict(f"test_local_{family}", labels, per_layer)
    child = supernet.create_derived(arch, img_size=16)
    assert isinstance(child.arch, ArchSpec) and child.search_space.name == "localmamba"
    spy = ScanSpy(monkeypatch)
    child(torch.randn(1, 3, 16, 16))
    assert len(spy.calls) == len(labels)
    for (_, mixer), want, (k, orders) in zip(child.named_mixers(), per_layer, spy.calls):
        assert mixer.order_names == tuple(want) and mixer.arch_logits is None and k == 4
        h, w = mixer.grid
        torch.testing.assert_close(orders.long(), torch.stack([scan_order(o, h, w) for o in want]), rtol=0, atol=0)


def test_create_derived_from_yaml(tmp_path) -> None:
    arch = example_arch("test_local_vim")
    path = save_arch(arch, tmp_path / "arch.yaml")
    child = supernet.create_derived(str(path), img_size=16)
    assert child.arch.orders == arch.orders
    assert [m.order_names for _, m in child.named_mixers()] == [tuple(o) for o in arch.orders]
    with pytest.raises(ValueError, match="no 'model'"):
        supernet.create_derived({k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "model"})


def test_arch_mismatch_is_a_one_line_value_error() -> None:
    labels = build("test_local_vim_search").arch_labels()
    too_long = _arch_dict("test_local_vim", labels + ["blocks.2"], [["h", "h_flip", "v", "v_flip"]] * 3)
    relabelled = _arch_dict("test_local_vim", ["blocks.0", "blocks.9"], [["h", "h_flip", "v", "v_flip"]] * 2)
    for bad, match in ((too_long, "3 layers but"), (relabelled, "labelled 'blocks.0'|labelled 'blocks.9'")):
        with pytest.raises(ValueError, match=match) as e:
            build("test_local_vim", arch=bad)
        assert "\n" not in str(e.value)
    vmamba_arch = example_arch("test_local_vmamba")
    with pytest.raises(ValueError, match="layers but"):
        build("test_local_vim", arch=vmamba_arch)


@pytest.mark.parametrize("family", ["vim", "vmamba"])
def test_sliced_child_equals_supernet_on_its_orders(family: str) -> None:
    """Same merge rule: a supernet computing exactly a child's orders (eval, hard, top-k) IS that child."""
    torch.manual_seed(0)
    search = build(f"test_local_{family}_search", img_size=16).eval()
    arch = supernet.derive_arch(search)
    child = supernet.create_derived(arch, img_size=16).eval()
    supernet.load_supernet_weights(child, search)
    search.set_arch_mode("hard", top_m=arch.space.k)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(child(x), search(x))
    # keys agree apart from the supernet's arch logits
    extra = {f"{label}.mixer.arch_logits" for label in search.arch_labels()}
    assert set(search.state_dict()) - set(child.state_dict()) == extra


def test_slicing_refuses_other_widths() -> None:
    search = build("test_local_vim_search", img_size=16)
    child = build("test_local_vim", img_size=16, embed_dim=48)
    with pytest.raises(ValueError, match="widths"):
        supernet.load_supernet_weights(child, search)


def test_mixer_merge_is_convex() -> None:
    torch.manual_seed(0)
    mixer = MultiOrderMixer(16, (4, 4), ("h", "v", "w2"), search=True, d_state=4)
    for mode in ("softmax", "gumbel", "hard"):
        mixer.set_arch_mode(mode, top_m=2)
        w, _ = mixer.branch_weights()
        torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    fixed = MultiOrderMixer(16, (4, 4), ("h", "v", "w2"), d_state=4)
    w, idx = fixed.branch_weights()
    assert idx is None and torch.allclose(w, torch.full((3,), 1 / 3))


_HAS_TRITON_SCAN = importlib.util.find_spec("kernels.triton_scan") is not None
_HAS_TRITON_CONV = importlib.util.find_spec("kernels.triton_conv") is not None


@pytest.mark.skipif(not _HAS_TRITON_SCAN, reason="kernels/triton_scan.py not there yet")
@pytest.mark.parametrize("name", ["test_vmamba", "test_local_vim", "test_vim"])
def test_triton_backend_matches_ref(name: str) -> None:
    if name == "test_local_vim" and not _HAS_TRITON_CONV:
        pytest.skip("kernels/triton_conv.py not there yet")
    if not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    torch.manual_seed(0)
    ref = build(name, img_size=8, scan_backend="ref", num_classes=3)
    tri = build(name, img_size=8, scan_backend="triton", num_classes=3, arch=getattr(ref, "arch", None))
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 8, 8)
    y_ref, y_tri = ref(x), tri(x)
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-4, atol=1e-4)
    y_ref.square().sum().backward()
    y_tri.square().sum().backward()
    grads = dict(ref.named_parameters())
    for n, p in tri.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-3, atol=1e-4, msg=n)


@pytest.mark.skipif(not _HAS_TRITON_SCAN, reason="kernels/triton_scan.py not there yet")
def test_sampled_supernet_triton_matches_ref() -> None:
    """A training step of a supernet in ``hard`` mode: the batched draw picks the same orders on both backends (same
    seed), and the Triton path (the sampled orders' parameters taken in one gather) gives the reference's outputs and
    gradients, arch logits included; the orders not sampled get zero gradients on both."""
    if not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    top_m = 2
    torch.manual_seed(0)
    ref = build("test_local_vim_search", img_size=8, scan_backend="ref", num_classes=3).train()
    tri = build("test_local_vim_search", img_size=8, scan_backend="triton", num_classes=3).train()
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 8, 8)
    outs = []
    for model in (ref, tri):
        model.set_arch_mode("hard", tau=0.7, top_m=top_m)
        torch.manual_seed(5)
        y = model(x)
        y.square().sum().backward()
        outs.append(y)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    grads = dict(ref.named_parameters())
    for n, p in tri.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-3, atol=1e-4, msg=n)
    rows = tri.blocks[0].mixer.A_log.grad.flatten(1).abs().sum(1)
    assert int((rows > 0).sum()) == top_m


@pytest.mark.parametrize("family", ["vim", "vmamba"])
def test_layers_draw_their_branch_weights_as_one_batch(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A supernet's forward draws every layer's noise in one call (not one per layer); without noise (eval, softmax)
    the batch gives each layer exactly what its own mixer gives."""
    model = build(f"test_local_{family}_search", img_size=16)
    mixers = [m for _, m in model.named_mixers()]
    assert len(mixers) > 1
    with torch.no_grad():
        for p in model.arch_parameters():
            p.normal_()
    for mode, train in (("softmax", True), ("gumbel", False), ("hard", False)):
        model.train(train)
        model.set_arch_mode(mode, tau=0.6, top_m=3)
        batched = supernet.mixer.batched_branch_weights(mixers)
        for (w, idx), m in zip(batched, mixers):
            w_own, idx_own = m.branch_weights()
            torch.testing.assert_close(w, w_own, rtol=0, atol=0)
            assert (idx is None and idx_own is None) or torch.equal(idx, idx_own)
    # layers with their own temperatures: the straight-through gradient of each follows its own
    model.eval()
    for j, m in enumerate(mixers):
        m.set_arch_mode("hard", tau=0.3 + 0.5 * j, top_m=2)
    batched = supernet.mixer.batched_branch_weights(mixers)
    for (w, _), m in zip(batched, mixers):
        (got,) = torch.autograd.grad(w.square().sum(), m.arch_logits, retain_graph=True)
        (want,) = torch.autograd.grad(m.branch_weights()[0].square().sum(), m.arch_logits)
        torch.testing.assert_close(got, want)
    # the weights are fp32 in a model cast to bf16 (as the mixer's own), fp64 in one cast to fp64 (gradcheck)
    for dtype, want in ((torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        model.to(dtype)
        assert all(w.dtype == want for w, _ in supernet.mixer.batched_branch_weights(mixers))
    model.float()
    draws = []
    real_rand = torch.rand

    def counting_rand(*args, **kwargs):
        draws.append(args[0] if args else kwargs.get("size"))
        return real_rand(*args, **kwargs)

    model.train()
    model.set_arch_mode("hard", tau=1.0, top_m=1)
    monkeypatch.setattr(torch, "rand", counting_rand)
    model(torch.randn(1, 3, 16, 16))
    assert [tuple(d) for d in draws] == [(len(mixers), 8)]


def _mixer_step(mixer: MultiOrderMixer, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mixer's output and every parameter's gradient of its squared sum."""
    mixer.zero_grad()
    y = mixer(x)
    y.square().sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in mixer.named_parameters()}


def _assert_same_step(got, want) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert got[1].keys() == want[1].keys()
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


class _GateInScanMerge(torch.nn.Module):
    """A plain merge that takes the branch attention's place, so the mixer gates every order in the scan."""

    def forward(self, y, w, backend="auto"):
        return kernels.branch_merge(y, w, backend=backend)


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("search", [False, True], ids=["fixed", "softmax"])
def test_gate_after_the_merge_equals_gating_every_order(
    backend: str, search: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the branch attention the mixer gates once, after the merge: the same outputs and gradients (arch
    logits included) as gating each order's scan output and merging after."""
    interpreted = __import__("os").environ.get("TRITON_INTERPRET") == "1"
    if backend == "triton" and not torch.cuda.is_available() and not interpreted:
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    torch.manual_seed(0)
    mixer = MultiOrderMixer(16, (3, 5), ("h", "v_flip", "w2"), search=search, d_state=4, scan_backend=backend)
    x = torch.randn(2, 15, 16)
    gated_in_scan = []
    real_scan = kernels.selective_scan

    def spy(*args, z=None, **kwargs):
        gated_in_scan.append(z is not None)
        return real_scan(*args, z=z, **kwargs)

    monkeypatch.setattr(kernels, "selective_scan", spy)
    once = _mixer_step(mixer, x)
    mixer.branch_attn = _GateInScanMerge()
    _assert_same_step(once, _mixer_step(mixer, x))
    assert gated_in_scan == [False, True]  # the default path gates after the merge; the stand-in in the scan
    assert ("arch_logits" in once[1]) == search


@pytest.mark.parametrize("d_state, dt_rank, conv", [(16, "auto", 4), (1, 6, 0), (4, 8, 4)])
def test_padded_projections_change_nothing(monkeypatch, d_state, dt_rank, conv):
    """The zero-padded x_proj/dt_proj (GEMM dimensions to multiples of 8) give the unpadded mixer's outputs and
    gradients: Vim-like (R + 2N = 34 here), VMamba-like (N = 1, shared input) and an already aligned rank."""
    torch.manual_seed(0)
    mixer = MultiOrderMixer(24, (3, 5), ("h", "v_flip", "w2"), d_state=d_state, dt_rank=dt_rank, d_conv=conv)
    x = torch.randn(2, 15, 24)
    pad = MultiOrderMixer._padded_projections
    padded = _mixer_step(mixer, x)
    monkeypatch.setattr(MultiOrderMixer, "_padded_projections", lambda self, a, b: (a, b))
    _assert_same_step(padded, _mixer_step(mixer, x))
    k, rows, d = mixer.x_proj_weight.shape
    x_w, dt_w = pad(mixer, mixer.x_proj_weight, mixer.dt_proj_weight)
    assert x_w.shape[1] % 8 == 0 and dt_w.shape[2] % 8 == 0 and x_w.shape[1] >= rows


def test_temperature_reaches_the_arch_gradient_after_a_dtype_round_trip() -> None:
    """``hard`` mode's straight-through gradient is that of softmax(logits / tau): the temperature the step reads (a
    device buffer, so that a compiled step does not specialise on it) follows every ``set_arch_mode`` call, also after
    the module went to bf16 and back (which rounds the buffer)."""
    mixer = MultiOrderMixer(16, (4, 4), ("h", "v", "w2"), search=True, d_state=4).eval()
    mixer.set_arch_mode("hard", tau=0.37, top_m=1)
    mixer.to(torch.bfloat16).float()  # the buffer now holds 0.3691
    for tau in (0.37, 2.5):
        mixer.set_arch_mode("hard", tau=tau, top_m=1)
        w, idx = mixer.branch_weights()
        (grad,) = torch.autograd.grad(w.sum(), mixer.arch_logits)
        logits = mixer.arch_logits.detach().float().requires_grad_()
        (want,) = torch.autograd.grad(torch.softmax(logits / tau, 0)[idx].sum(), logits)
        torch.testing.assert_close(grad, want)


@pytest.mark.parametrize("mix", ["softmax", "hard"])
def test_orders_reach_the_kernels_as_int32(mix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernels index in int32; orders of any other dtype would cost a conversion kernel in every scan and conv
    # call. Covers the sampled subset (hard) and the SLWS shuffle (the last layer always shuffles at P_max = 1).
    model = build("test_local_vim_search", img_size=16, mix=mix, shuffle_max=1.0).train()
    spy = ScanSpy(monkeypatch)
    model(torch.randn(2, 3, 16, 16))
    assert len(spy.calls) == len(model.blocks)
    assert all(orders.dtype == torch.int32 for _, orders in spy.calls)
    unshuffled = {tuple(row) for row in model.blocks[-1].mixer.orders.tolist()}
    assert all(tuple(row) not in unshuffled for row in spy.calls[-1][1].tolist())  # the shuffle was applied


def test_eval_hard_top_m_keeps_the_orders_derivation_keeps() -> None:
    """select_top_k's rule on the device: ties toward the earlier candidate, the space's global orders reserved."""
    import random

    from search_spaces import SearchSpace, select_top_k
    from supernet.mixer import derived_top_m

    rng = random.Random(0)
    for name in ("localmamba", "extended"):
        space = load_space(name)
        is_global = torch.tensor(space.global_mask)
        for _ in range(60):
            logits = torch.tensor([rng.choice([0.0, 1.0, rng.gauss(0, 1)]) for _ in space.candidates])
            probs = torch.softmax(logits, 0).tolist()
            for m in range(max(1, space.min_global), space.num_candidates + 1):
                sub = SearchSpace(name=name, candidates=space.candidates, k=m, min_global=space.min_global)
                got = derived_top_m(logits.unsqueeze(0), m, is_global, space.min_global)[0]
                assert [space.candidates[i] for i in got.tolist()] == select_top_k(sub, probs), (name, m, logits)


@pytest.mark.parametrize("space", ["localmamba", "extended"])
def test_a_derived_child_computes_the_supernets_eval_hard_output_when_logits_tie(space: str) -> None:
    """Zero (tied) logits: derivation and the supernet's eval-mode hard top-k keep the same orders, so the child
    with the supernet's weights gives the same logits (they differed: torch.topk broke ties another way, and ignored
    the space's min_global)."""
    torch.manual_seed(0)
    sn = build("test_local_vim_search", img_size=32, num_classes=5, space=space).double()
    with torch.no_grad():
        for p in sn.arch_parameters():
            p.zero_()
        sn.arch_parameters()[1][3:6] = 1.0
    arch = supernet.derive_arch(sn)
    sn.eval().set_arch_mode("hard", top_m=sn.search_space.k)
    child = supernet.create_derived(arch, img_size=32, num_classes=5).double()
    supernet.load_supernet_weights(child, sn)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert torch.equal(sn(x), child.eval()(x))
