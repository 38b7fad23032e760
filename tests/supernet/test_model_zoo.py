"""timm-style checks over every entrypoint: build, forward/backward, gradients, kwargs, sizes, the timm API."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import timm.optim
import torch
from supernet_testutils import (
    ALL_NAMES,
    SMALL_NAMES,
    TEST_NAMES,
    TINY_NAMES,
    build,
    example_arch,
    is_derived,
    small_size,
)

import kernels
import supernet
from kernels.library import scan_flops
from supernet.sizes import PUBLISHED


def test_registry_lists_the_contract_names() -> None:
    expected = {
        "vim_tiny", "vim_small", "vmamba_tiny", "local_vim_tiny_search", "local_vmamba_tiny_search",
        "local_vim_tiny", "local_vmamba_tiny", "local_fixed_vim_tiny",
        "vim_mini", "local_vim_mini_search", "local_vim_mini", "local_fixed_vim_mini",
        "vmamba_mini", "local_vmamba_mini_search", "local_vmamba_mini", "local_fixed_vmamba_mini",
        "test_vim", "test_local_vim_search", "test_local_vim", "test_local_fixed_vim",
        "test_vmamba", "test_local_vmamba_search", "test_local_vmamba",
    }  # fmt: skip
    assert expected <= set(ALL_NAMES)


@pytest.mark.parametrize("name", SMALL_NAMES)
def test_forward_backward_every_param_gets_grad(name: str) -> None:
    torch.manual_seed(0)
    size = small_size(name)
    model = build(name, img_size=size, num_classes=5)
    model.train()
    x = torch.randn(2, 3, size, size)
    y = model(x)
    assert y.shape == (2, 5) and torch.isfinite(y).all()
    y.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"no gradient for {no_grad}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad}"
    if name.endswith("_search"):
        assert all(p.grad.abs().sum() > 0 for p in model.arch_parameters())


@pytest.mark.parametrize("name", ["vim_mini", "vmamba_mini", "local_vim_mini_search"])
def test_fashion_mnist_shape(name: str) -> None:
    model = build(name, img_size=28, in_chans=1, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model.pretrained_cfg["input_size"] == (1, 28, 28)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_names_run_at_32px(name: str) -> None:
    model = build(name, img_size=32, num_classes=3).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 32, 32))
    assert y.shape == (1, 3) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_params_match_published(name: str) -> None:
    model = build(name)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / PUBLISHED[name][0] - 1.0) < 0.05, f"{name}: {params / 1e6:.2f}M"


@pytest.mark.parametrize("name", ["test_vim", "test_vmamba", "test_local_vim_search"])
def test_non_square_input(name: str) -> None:
    model = build(name, img_size=(16, 32)).eval()
    assert model(torch.randn(2, 3, 16, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["test_vim", "test_vmamba"])
@pytest.mark.parametrize("patch", [1, 2, 3, 4, 5, 6, 7, 9])
def test_every_patch_size_is_the_token_stride(name: str, patch: int) -> None:
    """The token grid is img_size / patch_size for any patch size; odd ones above 3 included (VMamba's two-conv stem
    splits the stride in two factors, and 5, 7, 9 have none but 1 and themselves)."""
    size = (2 * patch, 3 * patch)
    model = build(name, img_size=size, patch_size=patch).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 10)
    assert model.named_mixers()[0][1].grid == (2, 3)


@pytest.mark.parametrize("name", ["test_vim", "test_local_vim_search", "test_vmamba"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
)
def test_a_model_cast_to_half_precision_trains(name: str, dtype: torch.dtype, device: str) -> None:
    """``model.to(bf16/fp16)`` without autocast: the plain family keeps its residual in fp32 (residual_in_fp32) and
    still feeds each GEMM its weights' dtype; logits and gradients come out in the model's dtype (on a GPU through
    the Triton kernels)."""
    torch.manual_seed(0)
    model = build(name, img_size=16, num_classes=4).to(device, dtype)
    y = model(torch.randn(2, 3, 16, 16, dtype=dtype, device=device))
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in model.parameters())


def test_middle_class_token() -> None:
    model = build("test_vim", img_size=16, global_pool="token")
    grid = model.blocks[0].mixer.grid
    # the class token (index H·W) is visited at the middle step of every order
    orders = model.blocks[0].mixer.orders
    assert (orders[:, grid[0] * grid[1] // 2] == grid[0] * grid[1]).all()
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert model.cls_token.grad is not None


@pytest.mark.parametrize("name", ALL_NAMES)
def test_unknown_kwarg_is_a_type_error(name: str) -> None:
    with pytest.raises(TypeError, match="not_a_kwarg"):
        timm.create_model(name, not_a_kwarg=1)


@pytest.mark.parametrize("name", [n for n in ALL_NAMES if is_derived(n)])
def test_derived_requires_arch(name: str) -> None:
    with pytest.raises(TypeError, match="requires arch="):
        timm.create_model(name)


@pytest.mark.parametrize("name,size", [("test_vim", 30), ("test_vmamba", (32, 18)), ("vim_mini", 30)])
def test_bad_img_size_is_a_one_line_value_error(name: str, size) -> None:
    with pytest.raises(ValueError, match="not divisible by patch_size") as e:
        build(name, img_size=size)
    assert "\n" not in str(e.value)


def test_wrong_input_size_at_forward() -> None:
    model = build("test_vmamba", img_size=16)
    with pytest.raises(ValueError, match="does not match"):
        model(torch.randn(1, 3, 32, 32))


def test_bad_option_values() -> None:
    with pytest.raises(ValueError, match="mix must be one of"):
        build("test_local_vim_search", mix="darts")
    with pytest.raises(ValueError, match="only one of"):
        build("test_vim", space="localmamba")
    with pytest.raises(ValueError, match="unknown scan backend"):
        build("test_vim", scan_backend="cuda")
    with pytest.raises(ValueError, match="unknown scan order"):
        build("test_vim", orders=["h", "q"])


@pytest.mark.parametrize("name", ["test_vim", "test_local_vmamba_search"])
def test_timms_device_and_dtype_arguments(name: str) -> None:
    """timm's factory arguments place the model (not recorded with its constructor arguments)."""
    torch.manual_seed(0)
    placed = build(name, device="cpu", dtype=torch.float64)
    torch.manual_seed(0)
    plain = build(name).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in placed.parameters())
    assert placed.blocks[0].mixer.orders.dtype == torch.int32 if name == "test_vim" else True
    assert "device" not in placed.init_args and "dtype" not in placed.init_args
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert torch.equal(placed.eval()(x), plain.eval()(x))


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
)
@pytest.mark.parametrize("name", TEST_NAMES)
def test_a_meta_built_model_loads_weights_like_a_real_one(name: str, device: str) -> None:
    """PyTorch's and timm's meta-device flows: built on ``meta`` (``device="meta"`` or under ``torch.device("meta")``),
    then ``to_empty`` and ``load_state_dict``, or ``load_state_dict(assign=True)`` and timm's
    ``reinit_non_persistent_buffers``: the same outputs as the model the weights came from. The scan orders are
    computed buffers outside the state dict; before they are computed again a forward is one line."""
    from timm.models._manipulate import reinit_non_persistent_buffers

    def mixers(model):
        return [m for m in model.modules() if isinstance(m, supernet.MultiOrderMixer)]

    kw = {"img_size": 16, **({"arch": example_arch(name)} if is_derived(name) else {})}
    torch.manual_seed(0)
    ref = build(name, **kw).eval().to(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    want = ref(x)
    empty = build(name, **kw, device="meta")
    assert all(t.is_meta for t in [*empty.parameters(), *empty.buffers()])
    with torch.device("meta"):
        ctx = build(name, **kw)
    assert all(t.is_meta for t in [*ctx.parameters(), *ctx.buffers()])
    for model in (empty, ctx):
        model.to_empty(device=device)
        model.load_state_dict(ref.state_dict())
        for m, r in zip(mixers(model), mixers(ref), strict=True):
            assert torch.equal(m.orders, r.orders) and m.orders.dtype == torch.int32
            assert torch.equal(m._is_global, r._is_global) and torch.equal(m._tau, r._tau)
        assert torch.equal(model.eval()(x), want)
    assigned = build(name, **kw, device="meta")
    assigned.load_state_dict(ref.state_dict(), assign=True)
    with pytest.raises(RuntimeError, match="scan orders are still on the meta device") as e:
        assigned.eval()(x)
    assert "\n" not in str(e.value)
    assert len(reinit_non_persistent_buffers(assigned)) == len(mixers(ref))
    assert torch.equal(assigned(x), want)


def test_to_empty_of_a_real_model_computes_the_orders_again() -> None:
    """``to_empty`` gives every tensor new memory, a real model's too, and the orders are not in the state dict: they
    are computed again whether it is called on the model, on a mixer or through a wrapper (timm's ``features_only``).
    The memory is filled with a sentinel first, so uninitialised memory that happens to hold the right values cannot
    pass."""
    torch.manual_seed(0)
    ref = build("test_local_vim_search", img_size=16).eval()
    x = torch.randn(2, 3, 16, 16)

    def poisoned_to_empty(module):
        with torch.no_grad():
            real_empty_like = torch.empty_like
            try:  # what to_empty hands out, filled with a value no order, flag or temperature holds
                torch.empty_like = lambda t, **kw: real_empty_like(t, **kw).fill_(7 if t.dtype != torch.bool else 1)
                return module.to_empty(device="cpu")
            finally:
                torch.empty_like = real_empty_like

    model = poisoned_to_empty(build("test_local_vim_search", img_size=16))
    model.load_state_dict(ref.state_dict())
    assert torch.equal(model.eval()(x), ref(x))
    mixer = poisoned_to_empty(build("test_local_vim_search", img_size=16).blocks[1].mixer)
    assert torch.equal(mixer.orders, ref.blocks[1].mixer.orders) and mixer.orders.dtype == torch.int32
    assert torch.equal(mixer._is_global, ref.blocks[1].mixer._is_global) and mixer._tau.item() == 1.0
    ref_features = build("test_local_vim_search", img_size=16, features_only=True).eval()
    features = poisoned_to_empty(build("test_local_vim_search", img_size=16, features_only=True))
    features.load_state_dict(ref_features.state_dict())
    for got, want in zip(features.eval()(x), ref_features(x), strict=True):
        assert torch.equal(got, want)


def test_moves_and_casts_keep_the_computed_buffers() -> None:
    """A dtype cast keeps the orders int32 and rounds the temperature as a cast would; a module moved into shared
    memory keeps them there; values a user set are kept; a model built under inference mode can be cast."""
    model = build("test_local_vim_search", img_size=16)
    model.set_arch_mode("gumbel", tau=0.3)
    mixer = model.blocks[0].mixer
    orders = mixer.orders.clone()
    model.half()
    assert mixer.orders.dtype == torch.int32 and torch.equal(mixer.orders, orders)
    assert mixer._tau.dtype == torch.float16 and mixer._tau.item() == torch.tensor(0.3).half().item()
    model.float().share_memory()
    assert (
        mixer.orders.is_shared() and torch.equal(mixer.orders, orders) and mixer._tau.item() == pytest.approx(0.3, 1e-3)
    )
    with torch.no_grad():  # orders a user set (an ablation) survive moves and casts; only new memory is rewritten
        mixer.orders.copy_(mixer.orders.flip(0))
    model.to("cpu").double().float()
    assert torch.equal(mixer.orders, orders.flip(0))
    with torch.inference_mode():  # built under inference mode: its buffers are inference tensors
        frozen = build("test_local_vim_search", img_size=16)
    frozen.float().half().to("cpu")  # no in-place write into them outside inference mode


def test_building_a_class_under_the_meta_context_is_one_line() -> None:
    """The class computes its orders on the host, so under the context it refuses in one line, ``device=`` given or
    not; ``timm.create_model`` under the context builds on the host and places the model where ``device=`` says
    (meta by default)."""
    for kw in ({}, {"device": "meta"}):
        with torch.device("meta"), pytest.raises(ValueError, match="cannot be built under torch.device") as e:
            supernet.vim.VisionMamba(img_size=16, patch_size=4, embed_dim=16, depth=2, **kw)
        assert "\n" not in str(e.value)
    torch.manual_seed(0)
    ref = build("test_vim", img_size=16).eval()
    with torch.device("meta"):
        on_cpu = build("test_vim", img_size=16, device="cpu")
    assert not any(t.is_meta for t in [*on_cpu.parameters(), *on_cpu.buffers()])
    on_cpu.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(on_cpu.eval()(x), ref(x))


def test_the_temperature_buffer_follows_the_default_dtype() -> None:
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = build("test_local_vim_search", img_size=16)
    finally:
        torch.set_default_dtype(default)
    model.set_arch_mode("gumbel", tau=0.3)
    mixer = model.blocks[0].mixer
    assert mixer._tau.dtype == mixer.arch_logits.dtype == torch.float64 and mixer._tau.item() == 0.3


@pytest.mark.parametrize("name", ["test_vim", "test_vmamba"])
def test_numpy_ints_are_sizes_too(name: str) -> None:
    """Sizes from numpy (a sweep's sampled values) build the same model as Python ints."""
    import numpy as np

    depth = {"depth": np.int64(3)} if name == "test_vim" else {"depths": (np.int64(1), 1, 1, 1)}
    plain = {k: (int(v) if np.isscalar(v) else tuple(int(x) for x in v)) for k, v in depth.items()}
    torch.manual_seed(0)
    a = build(name, img_size=np.int64(32), patch_size=np.int64(4), **depth)
    torch.manual_seed(0)
    b = build(name, img_size=32, patch_size=4, **plain)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a.eval()(x), b.eval()(x))
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        build(name, patch_size=2.0)


@pytest.mark.parametrize("name", ["test_vim", "test_local_vmamba_search"])
def test_timm_api(name: str) -> None:
    model = build(name, img_size=16)
    x = torch.randn(2, 3, 16, 16)
    feats = model.forward_features(x)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.num_classes == 7
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    nwd = model.no_weight_decay()
    assert any(n.endswith(".A_log") for n in nwd) and any(n.endswith(".D") for n in nwd)
    assert set(nwd) <= {n for n, _ in model.named_parameters()} | {"pos_embed", "cls_token"}
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.9)
    assert len(opt.param_groups) > 1


def test_pretrained_filter_unwraps_and_refuses_a_non_square_pos_embed() -> None:
    from supernet.vim import checkpoint_filter_fn
    from supernet.vmamba import checkpoint_filter_fn as vmamba_filter

    model = timm.create_model("test_vim", img_size=16)
    weights = model.state_dict()
    for wrapped in ({"state_dict": weights, "model": "test_vim"}, {"model_state": weights}, weights):
        assert checkpoint_filter_fn(wrapped, model).keys() == weights.keys()
    vm = timm.create_model("test_vmamba").state_dict()
    assert vmamba_filter({"state_dict_ema": vm, "state_dict": {}, "model": "x"}, None) is vm
    c = weights["pos_embed"].shape[2]
    with pytest.raises(ValueError, match="not a square grid") as e:
        checkpoint_filter_fn({**weights, "pos_embed": torch.zeros(1, 6, c)}, model)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["test_vim", "test_vmamba"])
def test_pretrained_file_keeps_its_head_and_channels(name: str, tmp_path, caplog) -> None:
    """``pretrained=True`` with a file of a model trained on other classes than the cfg's default (5, not 10) and on
    one channel: timm keeps its head when ``num_classes`` matches the file's, drops it only when it does not, and
    loads the one-channel stem as it is, without a channel warning; the data config then has one mean and std."""
    from PIL import Image

    torch.manual_seed(0)
    src = build(name, img_size=32, num_classes=5, in_chans=1).eval()
    path = tmp_path / "best.pt"
    torch.save({"state_dict": src.state_dict(), "model_spec": {"name": name, "kwargs": {"img_size": 32}}}, path)
    overlay = {"file": path}  # a Path, as timm takes it too
    with caplog.at_level("WARNING"):
        same = timm.create_model(
            name, img_size=32, num_classes=5, in_chans=1, pretrained=True, pretrained_cfg_overlay=overlay
        ).eval()
    assert "source channels" not in caplog.text
    assert torch.equal(same.head.weight, src.head.weight) and torch.equal(same.head.bias, src.head.bias)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(same(x), src(x))
    from safetensors.torch import save_file

    save_file(src.state_dict(), tmp_path / "w.safetensors")  # weights only: the shapes come from its header
    legacy = tmp_path / "legacy.pt"  # torch's pre-zip format, which cannot be memory-mapped
    torch.save({"state_dict": src.state_dict()}, legacy, _use_new_zipfile_serialization=False)
    for kw in ({"file": str(tmp_path / "w.safetensors")}, {"state_dict": src.state_dict()}, {"file": legacy}):
        plain = timm.create_model(
            name, img_size=32, num_classes=5, in_chans=1, pretrained=True, pretrained_cfg_overlay=kw
        ).eval()
        assert torch.equal(plain(x), src(x))
    other = timm.create_model(
        name, img_size=32, num_classes=7, in_chans=1, pretrained=True, pretrained_cfg_overlay=overlay
    )
    assert other.head.weight.shape[0] == 7 and torch.equal(other.forward_features(x), src.forward_features(x))
    cfg = timm.data.resolve_model_data_config(same)
    assert cfg["input_size"] == (1, 32, 32) and len(cfg["mean"]) == len(cfg["std"]) == 1
    tf = timm.data.create_transform(**cfg)
    assert tf(Image.fromarray(np.zeros((32, 32), np.uint8), "L")).shape == (1, 32, 32)


def test_pretrained_file_resamples_from_the_grid_it_records(tmp_path) -> None:
    """A checkpoint of the trainers records its img_size, so a non-square position embedding is resampled from its
    own grid: transposed (same token count) and to a square grid of the same count, both of which the token count
    alone would have passed through unchanged; at its own size it loads unchanged."""
    from timm.layers import resample_abs_pos_embed

    src = build("test_vim", img_size=(16, 64))  # 4 x 16 = 64 tokens
    path = tmp_path / "best.pt"
    torch.save({"state_dict": src.state_dict(), "model_spec": {"kwargs": {"img_size": [16, 64]}}}, path)
    overlay = {"file": str(path)}
    for size in [(64, 16), 32, (16, 64)]:
        model = timm.create_model("test_vim", img_size=size, pretrained=True, pretrained_cfg_overlay=overlay)
        want = resample_abs_pos_embed(src.pos_embed, list(model.grid), old_size=list(src.grid), num_prefix_tokens=0)
        assert torch.equal(model.pos_embed, want if model.grid != src.grid else src.pos_embed), size
        assert model.grid == src.grid or not torch.equal(model.pos_embed, src.pos_embed)


def test_timm_conventions_head_hidden_size_pool_size_and_size_errors() -> None:
    for name in ("test_vim", "test_vmamba"):
        model = build(name, img_size=32)
        assert model.head_hidden_size == model.num_features
        with pytest.raises(ValueError, match=r"resize the input to it, or build the model with img_size=\(24, 24\)"):
            model(torch.randn(1, 3, 24, 24))
    pruned = build("test_vmamba", img_size=32)
    pruned.prune_intermediate_layers([1])
    assert pruned.head_hidden_size == pruned.num_features == pruned.feature_info[1]["num_chs"]
    for size in (224, 256):
        model = timm.create_model("vmamba_tiny", img_size=size, device="meta")
        assert model.pretrained_cfg["pool_size"] == model.stages[-1].grid == (size // 32, size // 32)


def test_grad_checkpointing_matches() -> None:
    torch.manual_seed(0)
    model = build("test_local_vim", img_size=16)
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


@pytest.mark.parametrize("norm_layer", ["rmsnorm", "layernorm"])
def test_block_pair_is_the_usual_residual_block(norm_layer: str) -> None:
    """A block on (hidden, residual) is ``x + mixer(norm(x))`` with x = hidden + residual: the sum of its outputs,
    and its residual output is x (x itself for the first block)."""
    torch.manual_seed(0)
    block = build("test_vim", img_size=16, norm_layer=norm_layer).blocks[1]
    h, r = torch.randn(2, 2, 16, block.norm.weight.shape[0])
    x = h + r
    out, res = block(h, r)
    torch.testing.assert_close(out + res, x + block.mixer(block.norm(x)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res, x, rtol=0, atol=0)
    out0, res0 = block(x)
    torch.testing.assert_close(out0, out, rtol=1e-5, atol=1e-5)
    assert torch.equal(res0, x)


class _Scale(torch.nn.Module):
    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c * x


def test_each_blocks_drop_path_scales_its_own_mixer_output() -> None:
    """forward_features is ``x_{i+1} = x_i + drop_path_i(mixer_i(norm_i(x_i)))`` then the final norm, with block i's
    own drop path (Vim's code applies block i's rate to block i-1's output); the drop paths are stand-in scalings."""
    torch.manual_seed(0)
    model = build("test_vim", img_size=16).eval()
    for i, blk in enumerate(model.blocks):
        blk.drop_path = _Scale(0.5 + i)
    img = torch.randn(2, 3, 16, 16)
    x = model.patch_embed(img) + model.pos_embed
    for blk in model.blocks:
        x = x + blk.drop_path(blk.mixer(blk.norm(x)))
    torch.testing.assert_close(model.forward_features(img), model.norm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_blocks_hand_the_mixer_the_autocast_dtype(autocast: bool) -> None:
    """Under autocast the fused norm writes the autocast dtype the mixer's first GEMM reads; otherwise the stream's
    fp32. The residual stream stays fp32 either way."""
    model = build("test_vim", img_size=16)
    seen = []
    model.blocks[1].mixer.register_forward_pre_hook(lambda mod, args, kw: seen.append(args[0].dtype), with_kwargs=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        h, r = model.blocks[1](torch.randn(2, 16, model.embed_dim), torch.randn(2, 16, model.embed_dim))
    assert seen == [torch.bfloat16 if autocast else torch.float32]
    assert r.dtype == torch.float32


def test_rmsnorm_eps_none_uses_the_sums_dtype() -> None:
    """nn.RMSNorm's eps=None means the machine epsilon of the normalized tensor: in a block that is the fp32 sum, even
    when the incoming hidden state is bf16."""
    from supernet.vim import RMSNorm, add_norm

    norm = RMSNorm(8, eps=None)
    x, res = (1e-2 * torch.randn(3, 8)).bfloat16(), 1e-2 * torch.randn(3, 8)
    torch.testing.assert_close(add_norm(norm, x, res)[0], norm(res + x))


def test_count_params_flops() -> None:
    real_scan = kernels.selective_scan
    search = build("test_local_vim_search", img_size=16)
    child = build("test_local_vim", img_size=16)
    ps, fs = supernet.count_params_flops(search, 16)
    pc, fc = supernet.count_params_flops(child, 16)
    assert ps == sum(p.numel() for p in search.parameters()) and ps > pc
    assert fs > fc > 0
    assert search.training and kernels.selective_scan is real_scan  # mode and ops restored
    # every order costs the same: the count is linear in the number of orders computed, and each order's share
    # includes its scans by VMamba's rule (one per layer)
    counts = []
    for m in (2, 4, 6, 8):
        search.set_arch_mode("hard", top_m=m)
        counts.append(supernet.count_params_flops(search, 16)[1])
    assert counts[1] == fc and counts[3] == fs
    step = counts[1] - counts[0]
    assert counts[2] - counts[1] == step and counts[3] - counts[2] == step
    mixer = child.blocks[0].mixer
    tokens = mixer.grid[0] * mixer.grid[1]
    scan = scan_flops((1, tokens, 1, mixer.d_inner), (1, mixer.d_inner, mixer.d_state), True, True)
    assert step > 2 * len(child.blocks) * scan


class _PlainMerge(torch.nn.Module):
    def forward(self, y, w, backend="auto"):
        return kernels.branch_merge(y, w, backend=backend)


def test_flop_count_does_not_depend_on_where_the_gate_runs() -> None:
    """Vim's z gate runs once after the merge; the count charges it per order, as VMamba's rule does in the scan."""
    model = build("test_vim", img_size=16)
    after = supernet.count_params_flops(model, 16)[1]
    for block in model.blocks:  # the branch-attention path: the same mixer with the gate in the scan
        block.mixer.branch_attn = _PlainMerge()
    assert supernet.count_params_flops(model, 16)[1] == after


def test_plain_model_compiles_to_one_graph_under_autocast() -> None:
    """The (hidden, residual) blocks with SLWS under autocast: Dynamo traces the whole forward as one graph."""
    model = build("test_vim", img_size=16, shuffle_max=0.5, num_classes=3).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(torch.randn(2, 3, 16, 16))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_coinciding_orders_warn_where_it_matters() -> None:
    """Orders that give one permutation on the layer's grid are warned about (a search splits probability between
    identical scans; a fixed layer scans one order twice), except a fixed layer on a single token, which every
    hierarchical model has on a small enough image."""
    import warnings

    def warned(grid, orders, search):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            supernet.MultiOrderMixer(8, grid, orders, search=search, d_state=2)
        return [str(w.message) for w in caught if "coincide" in str(w.message)]

    assert warned((2, 1), ["h", "v"], search=False) == [
        "scan orders coincide on the 2x1 token grid: h = v; this layer scans the same order more than once"
    ]
    assert "splits probability between identical scans" in warned((1, 1), ["h", "v"], search=True)[0]
    assert warned((1, 1), ["h", "v"], search=False) == [] and warned((3, 3), ["h", "v"], search=False) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the registered CI model at its own size builds without one
        timm.create_model("test_vmamba")
