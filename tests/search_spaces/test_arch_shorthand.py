"""Hand-written arches: layers without labels (the shorthand) match a model's layers by position."""

from __future__ import annotations

import pytest

from search_spaces import ArchSpec, load_arch, save_arch

_ORDERS = [["h", "h_flip", "w2", "w2_flip"], ["v", "v_flip", "w7", "h"], ["w2", "h", "v", "w7_flip"]]


def _shorthand(layers: list) -> dict:
    return {"format_version": 1, "space": "localmamba", "layers": layers}


def test_unlabelled_layers_match_by_position(tmp_path) -> None:
    arch = load_arch(_shorthand([_ORDERS[0], {"orders": _ORDERS[1]}, {"label": "blocks.2", "orders": _ORDERS[2]}]))
    assert [layer.label for layer in arch.layers] == [None, None, "blocks.2"]
    assert arch.layers[1].orders == ("h", "v", "v_flip", "w7")  # canonical (candidate) order, as for labelled layers
    labels = ["blocks.0", "blocks.1", "blocks.2"]
    arch.check_compatible(labels, arch.space)
    named = arch.with_labels(labels)
    assert [layer.label for layer in named.layers] == labels and named.orders == arch.orders
    # A written shorthand arch stays unlabelled, and loads back equal.
    assert "label" not in arch.to_dict()["layers"][0] and arch.to_dict()["layers"][2]["label"] == "blocks.2"
    assert load_arch(save_arch(arch, tmp_path / "arch.yaml")) == arch


def test_unlabelled_layers_keep_the_other_checks() -> None:
    arch = load_arch(_shorthand([_ORDERS[0], _ORDERS[1], {"label": "blocks.2", "orders": _ORDERS[2]}]))
    with pytest.raises(ValueError, match="3 layers but m has 2"):
        arch.check_compatible(["blocks.0", "blocks.1"], model="m")
    with pytest.raises(ValueError, match="arch layer 2 is labelled 'blocks.2' but m layer 2 is 'stages.2'"):
        arch.check_compatible(["stages.0", "stages.1", "stages.2"], model="m")
    for bad, match in (([["h", "h_flip", "v"]], "arch layer 0: 3 orders chosen"), ([["h", "q", "v", "w2"]], "'q'")):
        with pytest.raises(ValueError, match=match) as e:
            load_arch(_shorthand(bad))
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="layer 0 must be a list of orders or a mapping with 'orders'"):
        load_arch(_shorthand(["h"]))


@pytest.mark.parametrize("spec", [[_ORDERS[0]] * 3, tuple([_ORDERS[0]] * 3), 3])
def test_load_arch_names_the_forms_it_takes(spec) -> None:
    with pytest.raises(TypeError, match="arch must be an arch YAML path, a dict or an ArchSpec") as e:
        load_arch(spec)
    assert "\n" not in str(e.value) and "'space'" in str(e.value)


def test_arch_spec_passes_through() -> None:
    arch = load_arch(_shorthand([_ORDERS[0]]))
    assert isinstance(arch, ArchSpec) and load_arch(arch) is arch


def test_orders_given_as_one_string_are_one_line() -> None:
    """``orders: 'h h_flip w2 w2_flip'`` is not read letter by letter (which named the order ' ' as unknown)."""
    with pytest.raises(ValueError, match=r"layer 0: 'orders' must be a list of order names, e.g. \[h, h_flip") as e:
        load_arch(_shorthand([{"orders": "h h_flip w2 w2_flip"}]))
    assert "\n" not in str(e.value)


def test_save_arch_leaves_no_temporary_file_when_it_fails(tmp_path) -> None:
    arch = load_arch(_shorthand([_ORDERS[0]]))
    (tmp_path / "arch.yaml").mkdir()  # a folder where the file goes: the final rename fails
    with pytest.raises(OSError):
        save_arch(arch, tmp_path / "arch.yaml", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arch.yaml"]
