"""What models accept as ``arch=`` (the shorthand of bare per-layer order lists) and their input/output sizes."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from supernet_testutils import build

from search_spaces import ArchSpec

_CHOICES = [["h", "h_flip", "w2", "w2_flip"], ["v", "v_flip", "w7", "h"]]


def _shorthand(depth: int) -> dict:
    return {"format_version": 1, "space": "localmamba", "layers": [_CHOICES[i % 2] for i in range(depth)]}


@pytest.mark.parametrize("family", ["vim", "vmamba"])
def test_shorthand_arch_builds_a_child(family: str) -> None:
    depth = len(build(f"test_local_{family}_search").arch_labels())
    child = timm.create_model(f"test_local_{family}", arch=_shorthand(depth), img_size=16)
    assert [m.order_names for _, m in child.named_mixers()] == [tuple(child.arch.orders[i]) for i in range(depth)]
    assert [set(m.order_names) for _, m in child.named_mixers()] == [set(_CHOICES[i % 2]) for i in range(depth)]
    # The child's arch carries its labels, so writing it gives a complete arch file.
    assert isinstance(child.arch, ArchSpec) and [layer.label for layer in child.arch.layers] == child.arch_labels()
    assert child(torch.randn(1, 3, 16, 16)).shape == (1, child.num_classes)


def test_shorthand_arch_builds_the_registered_child() -> None:
    arch = {"format_version": 1, "space": "localmamba", "layers": [["h", "h_flip", "w2", "w2_flip"]] * 20}
    child = timm.create_model("local_vim_tiny", arch=arch, img_size=64)
    assert child.arch.orders == [["h", "h_flip", "w2", "w2_flip"]] * 20


def test_shorthand_arch_still_checks_depth_and_labels() -> None:
    labels = build("test_local_vim_search").arch_labels()
    with pytest.raises(ValueError, match=f"{len(labels) + 1} layers but test_local_vim has {len(labels)}") as e:
        timm.create_model("test_local_vim", arch=_shorthand(len(labels) + 1))
    assert "\n" not in str(e.value)
    mislabelled = _shorthand(len(labels))
    mislabelled["layers"][-1] = {"label": "blocks.9", "orders": _CHOICES[0]}
    with pytest.raises(ValueError, match=f"labelled 'blocks.9' but test_local_vim layer {len(labels) - 1}"):
        timm.create_model("test_local_vim", arch=mislabelled)


def test_a_bare_list_as_arch_is_a_one_line_type_error() -> None:
    depth = len(build("test_local_vim_search").arch_labels())
    with pytest.raises(TypeError, match="arch must be an arch YAML path, a dict or an ArchSpec, got list") as e:
        timm.create_model("test_local_vim", arch=_shorthand(depth)["layers"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["test_vim", "test_vmamba", "test_local_vim_search", "test_local_vmamba_search"])
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"in_chans": 0}, "in_chans must be a positive int .* got 0"),
        ({"in_chans": -3}, "in_chans must be a positive int .* got -3"),
        ({"in_chans": 2.0}, "in_chans must be a positive int .* got 2.0"),
        ({"num_classes": -1}, r"num_classes must be an int >= 0 \(0: no classifier\), got -1"),
        ({"patch_size": 0}, "patch_size must be a positive int, got 0"),
    ],
)
def test_bad_sizes_are_refused_at_construction(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=f"{name}: {match}") as e:
        timm.create_model(name, **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["test_vim", "test_vmamba"])
def test_edge_sizes_still_build(name: str) -> None:
    model = timm.create_model(name, in_chans=1, num_classes=0, img_size=16)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, model.num_features)
    with pytest.raises(ValueError, match="reset_classifier: num_classes must be an int >= 0"):
        model.reset_classifier(-1)
    model.reset_classifier(5)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 5)


@pytest.mark.parametrize("name", ["test_vim", "test_vmamba"])
def test_img_size_takes_any_integer_type_and_refuses_the_rest_in_one_line(name: str) -> None:
    model = timm.create_model(name, img_size=np.int64(16))
    assert model.img_size == (16, 16) and type(model.img_size[0]) is int
    assert timm.create_model(name, img_size=[np.int32(16), 32]).img_size == (16, 32)
    for bad in (16.0, "16", (16, 16, 16), (16, 0), (True, 16)):  # (None: timm drops it, the default size)
        with pytest.raises(ValueError, match=r"img_size must be a positive int or a pair \(H, W\) of them") as e:
            timm.create_model(name, img_size=bad)
        assert "\n" not in str(e.value)


def test_space_or_arch_on_an_entry_point_with_its_own_orders_says_which_to_use() -> None:
    for name, kwargs in (("test_vim", {"space": "vim"}), ("test_local_vim_search", {"orders": ["h", "v"]})):
        with pytest.raises(ValueError, match=r"pass only one of .* for a supernet use a \*_search entry point") as e:
            timm.create_model(name, **kwargs)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("test_vim", {"embed_dim": -8}, r"embed_dim must be a positive int \(or a list of them\), got -8"),
        ("test_vim", {"depth": 0}, r"depth must be a positive int"),
        ("test_vim", {"expand": 0.0}, r"expand must be a positive number, got 0.0"),
        ("test_vmamba", {"dims": (16, 0, 32, 48)}, r"dims must be a positive int \(or a list of them\), got \(16, 0"),
        ("test_vmamba", {"d_state": 1.5}, r"d_state must be a positive int"),
        ("test_vmamba", {"d_conv": -1}, r"d_conv must be an int >= 0 \(0: no conv\), got -1"),
    ],
)
def test_sizes_that_cannot_build_a_model_are_one_line(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=f"{name}: {match}") as e:
        timm.create_model(name, **kwargs)
    assert "\n" not in str(e.value)
    timm.create_model(name, d_conv=0)  # no conv: still a model
