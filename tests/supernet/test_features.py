"""timm's feature API on every entrypoint: ``forward_intermediates``, ``prune_intermediate_layers``, ``feature_info``
and ``features_only=True``."""

from __future__ import annotations

import pytest
import timm
import torch
from supernet_testutils import ALL_NAMES, SMALL_NAMES, TINY_NAMES, build, is_derived, small_size

PLAIN = {n for n in ALL_NAMES if "vim" in n}


def _grid_tokens(model: torch.nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """forward_features' output as (B, C, H', W') grid features, either family."""
    if feats.ndim == 4:  # hierarchical: (B, H', W', C)
        return feats.permute(0, 3, 1, 2)
    h, w = model.grid
    return feats[:, : model.num_grid_tokens].reshape(feats.shape[0], h, w, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("name", SMALL_NAMES)
def test_intermediates_match_feature_info_and_forward_features(name: str) -> None:
    torch.manual_seed(0)
    size = small_size(name)
    model = build(name, img_size=(size, 2 * size)).eval()  # non-square: rows and columns cannot be swapped
    x = torch.randn(2, 3, size, 2 * size)
    with torch.no_grad():
        out, inter = model.forward_intermediates(x)
        feats = model.forward_features(x)
        _, normed = model.forward_intermediates(x, indices=1, norm=True)
    torch.testing.assert_close(out, feats)
    assert len(inter) == len(model.feature_info)
    for t, info in zip(inter, model.feature_info):
        r = info["reduction"]  # the hierarchical grids round up when they halve an odd size
        assert t.shape == (2, info["num_chs"], -(-size // r), -(-2 * size // r))
        assert torch.isfinite(t).all()
    # The last intermediate, normed, is what forward_features returns for the grid.
    torch.testing.assert_close(normed[0], _grid_tokens(model, feats))


@pytest.mark.parametrize("name", ["test_vim", "test_local_vim_search", "test_vmamba", "test_local_vmamba"])
def test_each_intermediate_is_the_stream_after_its_layer(name: str) -> None:
    """Intermediate i is what the model cut after layer i (the same weights) takes there, and the cut model's
    forward_features are it (plain family: normed with the final norm; hierarchical: as it is)."""
    torch.manual_seed(1)
    size = small_size(name)
    model = build(name, img_size=size).eval()
    x = torch.randn(2, 3, size, size)
    n = len(model.feature_info)
    with torch.no_grad():
        _, inter = model.forward_intermediates(x, norm=False)
    for i in range(n - 1):
        cut = build(name, img_size=size).eval()
        cut.load_state_dict(model.state_dict())
        assert cut.prune_intermediate_layers([i], prune_norm=False) == [i]
        assert len(cut.feature_info) == i + 1
        with torch.no_grad():
            last = cut.forward_intermediates(x, indices=[i], intermediates_only=True)[0]
            feats = cut.forward_features(x)  # the cut model's own features: its last layer's width and norm
            normed = model.forward_intermediates(x, indices=[i], norm=True, intermediates_only=True)[0]
        torch.testing.assert_close(last, inter[i])
        assert feats.shape[-1] == cut.num_features == cut.feature_info[-1]["num_chs"]
        # plain: the cut keeps the final norm (one width); hierarchical: an earlier stage's output has no norm
        torch.testing.assert_close(_grid_tokens(cut, feats), normed if name in PLAIN else inter[i])


@pytest.mark.parametrize("name", ["test_vim", "test_vmamba"])
def test_index_forms_formats_and_stop_early(name: str) -> None:
    torch.manual_seed(2)
    size = small_size(name)
    model = build(name, img_size=size).eval()
    x = torch.randn(2, 3, size, size)
    n = len(model.feature_info)
    with torch.no_grad():
        _, every = model.forward_intermediates(x)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        fmt = "NLC" if name in PLAIN else "NHWC"
        other = model.forward_intermediates(x, output_fmt=fmt, intermediates_only=True)
    for got, want in zip(last_two, every[n - 2 :]):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(picked[0], every[0])
    torch.testing.assert_close(picked[1], every[-1])
    torch.testing.assert_close(early[0], every[0])
    for got, want in zip(other, every):
        want = want.permute(0, 2, 3, 1)
        torch.testing.assert_close(got, want.flatten(1, 2) if fmt == "NLC" else want)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NDHWC")


def test_class_token_is_a_prefix_token() -> None:
    torch.manual_seed(3)
    model = build("test_vim", img_size=16, global_pool="token").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plain = model.forward_intermediates(x, intermediates_only=True, output_fmt="NLC")
        pairs = model.forward_intermediates(x, intermediates_only=True, output_fmt="NLC", return_prefix_tokens=True)
        _, normed = model.forward_intermediates(x, indices=1, norm=True, return_prefix_tokens=True, output_fmt="NLC")
        feats = model.forward_features(x)
    assert plain[0].shape == (2, model.num_grid_tokens, model.embed_dim)
    for t, (grid, cls) in zip(plain, pairs):
        torch.testing.assert_close(grid, t)
        assert cls.shape == (2, 1, model.embed_dim)
    torch.testing.assert_close(normed[0][1], feats[:, model.num_grid_tokens :])


@pytest.mark.parametrize("name", SMALL_NAMES)
def test_features_only_model(name: str) -> None:
    """features_only=True (timm's getter wrapper) returns the full model's intermediates with the same weights, trains
    (every kept parameter, arch logits included, gets a gradient) and keeps only the layers it needs."""
    torch.manual_seed(4)
    size = small_size(name)
    kwargs = dict(img_size=size, in_chans=1)
    if is_derived(name):
        kwargs["arch"] = build(name, **kwargs).arch
    full = build(name, **kwargs).eval()
    out_indices = [0, 1] if name in PLAIN else [1, 2]
    feat = build(name, features_only=True, out_indices=out_indices, **kwargs).eval()
    missing, _ = feat.model.load_state_dict(full.state_dict(), strict=False)
    assert not missing
    assert feat.feature_info.channels() == [full.feature_info[i]["num_chs"] for i in out_indices]
    assert feat.feature_info.reduction() == [full.feature_info[i]["reduction"] for i in out_indices]
    assert feat.pretrained_cfg["input_size"] == (1, size, size)
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        want = full.forward_intermediates(x, indices=out_indices, intermediates_only=True)
        got = feat(x)
    assert len(got) == len(out_indices)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    feat.train()
    sum(f.square().mean() for f in feat(x)).backward()
    no_grad = [n for n, p in feat.named_parameters() if p.grad is None]
    assert not no_grad, f"no gradient for {no_grad}"
    if name in PLAIN:
        assert len(feat.model.blocks) == max(out_indices) + 1
    else:
        assert len(feat.model.stages) == max(out_indices) + 1
    assert isinstance(feat.model.head, torch.nn.Identity) and isinstance(feat.model.norm, torch.nn.Identity)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_features_only_default_indices_at_imagenet_names(name: str) -> None:
    """Default out_indices: the last three blocks of a plain model (as timm's ViTs), every stage of a hierarchical."""
    feat = build(name, features_only=True, img_size=32)
    full = build(name, img_size=32)
    n = len(full.feature_info)
    assert feat.feature_info.out_indices == ((n - 3, n - 2, n - 1) if name in PLAIN else tuple(range(n)))


def test_out_indices_without_features_only_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="out_indices"):
        timm.create_model("test_vim", out_indices=(0, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["test_local_vim_search", "test_local_vmamba", "vim_tiny"])
def test_features_only_on_the_gpu_under_autocast(name: str) -> None:
    """On a GPU (the Triton kernels), bf16 autocast: the backbone's features are the full model's, and it trains."""
    torch.manual_seed(5)
    size = 32 if name.startswith("test_") else 224
    full = build(name, img_size=size).cuda().eval()
    kwargs = dict(arch=full.arch) if is_derived(name) else {}
    feat = build(name, img_size=size, features_only=True, **kwargs).cuda().eval()
    feat.model.load_state_dict(full.state_dict(), strict=False)
    x = torch.randn(2, 3, size, size, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        want = full.forward_intermediates(x, indices=feat.feature_info.out_indices, intermediates_only=True)
        got = feat(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    feat.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = sum(f.float().square().mean() for f in feat(x))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in feat.parameters())


@pytest.mark.parametrize("name", ["test_vim", "test_vmamba", "test_local_vmamba_search"])
def test_stop_early_returns_the_last_taken_layers_features(name: str) -> None:
    """stop_early with the final features: the plain family's, normed (one width throughout); the hierarchical
    family's, the stopped stage's own output (the final norm has the last stage's width)."""
    torch.manual_seed(6)
    size = small_size(name)
    model = build(name, img_size=size).eval()
    x = torch.randn(2, 3, size, size)
    n = len(model.feature_info)
    for i in range(n):
        with torch.no_grad():
            final, (inter,) = model.forward_intermediates(x, indices=[i], stop_early=True, output_fmt="NCHW")
            _, (normed,) = model.forward_intermediates(x, indices=[i], norm=True, stop_early=True)
        if name in PLAIN:
            torch.testing.assert_close(_grid_tokens(model, final), normed)
        elif i < n - 1:
            torch.testing.assert_close(final.permute(0, 3, 1, 2), inter)
        else:
            torch.testing.assert_close(final, model.forward_features(x))


@pytest.mark.parametrize(
    "indices, match",
    [(0, "last n"), (-1, "last n"), (9, "last n"), ([], "empty"), ([-9], "out of range"), ([7], "out of range"),
     ("1", "list of ints"), (1.5, "list of ints"), ([0, 1.0], "list of ints"), ([True], "list of ints")],
)  # fmt: skip
def test_bad_indices_are_one_line_value_errors(indices, match: str) -> None:
    model = build("test_vmamba", img_size=16).eval()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match=match) as e:
        model.forward_intermediates(x, indices=indices)
    assert "\n" not in str(e.value) and repr(indices) in str(e.value)
    with pytest.raises(ValueError, match=match):
        build("test_vim", img_size=16, features_only=True, out_indices=indices)


@pytest.mark.parametrize("name", ["test_vim", "test_vmamba"])
def test_repeated_or_unordered_indices_are_taken_once_in_layer_order(name: str) -> None:
    torch.manual_seed(7)
    model = build(name, img_size=16).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        n = len(model.feature_info)
        got = model.forward_intermediates(x, indices=[1, 0, 1 - n, 1], intermediates_only=True)
    assert len(got) == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    feat = build(name, img_size=16, features_only=True, out_indices=[1, 0, 0]).eval()
    with torch.no_grad():
        out = feat(x)
    assert feat.feature_info.channels() == [o.shape[1] for o in out] and len(out) == 2


def test_prefix_tokens_of_a_model_without_a_class_token_are_empty() -> None:
    model = build("test_vim", img_size=16).eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 16, 16)
        pairs = model.forward_intermediates(x, return_prefix_tokens=True, intermediates_only=True)
    for grid, prefix in pairs:
        assert grid.shape == (2, model.embed_dim, 4, 4) and prefix.shape == (2, 0, model.embed_dim)
