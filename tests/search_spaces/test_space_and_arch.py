"""Search spaces, presets, top-k selection and the arch file."""

from __future__ import annotations

import pytest
import yaml

from search_spaces import (
    ArchSpec,
    LayerChoice,
    SearchSpace,
    list_presets,
    load_arch,
    load_space,
    save_arch,
    select_top_k,
)


def test_presets() -> None:
    assert set(list_presets()) >= {"localmamba", "vim", "vmamba", "extended"}
    lm = load_space("localmamba")
    assert lm.candidates == ("h", "h_flip", "v", "v_flip", "w2", "w2_flip", "w7", "w7_flip") and lm.k == 4
    assert load_space("vim").candidates == ("h", "h_flip")
    assert load_space("vmamba").candidates == ("h", "v", "h_flip", "v_flip")
    ext = load_space("extended")
    assert set(lm.candidates) < set(ext.candidates)
    assert {"wv2", "zh", "zv", "w3"} <= set(ext.candidates) and ext.min_global >= 1


def _write(tmp_path, data) -> str:
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


@pytest.mark.parametrize(
    "data,match",
    [
        ({"candidates": ["h", "q"], "k": 1}, "unknown scan order 'q'"),
        ({"candidates": ["h", "h", "v"], "k": 2}, "duplicate candidates"),
        ({"candidates": ["h", "v"], "k": 3}, "k=3 is out of range"),
        ({"candidates": ["h", "v"], "k": 0}, "k=0 is out of range"),
        ({"candidates": ["h", "w2"], "k": 1, "min_global": 2}, "min_global=2 is out of range"),
        ({"candidates": ["h"], "k": 1, "kk": 2}, "did you mean 'k'"),
        ({"candidates": "h", "k": 1}, "must be a list"),
        ({"k": 1}, "missing key 'candidates'"),
        ({"candidates": [], "k": 1}, "empty"),
    ],
)
def test_space_errors_are_one_line(tmp_path, data, match) -> None:
    with pytest.raises(ValueError, match=match) as e:
        load_space(_write(tmp_path, data))
    assert "\n" not in str(e.value)


def test_space_file_and_unknown_preset(tmp_path) -> None:
    s = load_space(_write(tmp_path, {"name": "mine", "candidates": ["h", "w3_flip", "zv"], "k": 2, "min_global": 1}))
    assert s.name == "mine" and s.k == 2
    with pytest.raises(ValueError, match="did you mean 'localmamba'"):
        load_space("localmambaa")
    with pytest.raises(ValueError, match="not found"):
        load_space(str(tmp_path / "nope.yaml"))


def test_select_top_k_respects_k_order_and_constraint() -> None:
    s = load_space("localmamba")
    probs = [0.05, 0.3, 0.05, 0.1, 0.2, 0.1, 0.15, 0.05]
    assert select_top_k(s, probs) == ["h_flip", "v_flip", "w2", "w7"]
    windows_first = SearchSpace("c", ("h", "v", "w2", "w3", "w4"), k=3, min_global=1)
    assert select_top_k(windows_first, [0.1, 0.05, 0.3, 0.3, 0.25]) == ["h", "w2", "w3"]
    ties = SearchSpace("t", ("h", "v", "w2"), k=2)
    assert select_top_k(ties, [1 / 3] * 3) == ["h", "v"]
    with pytest.raises(ValueError, match="3 probabilities"):
        select_top_k(s, [0.1, 0.2, 0.7])


def _arch(space: SearchSpace, layers: list[list[str]]) -> ArchSpec:
    return ArchSpec(
        space=space,
        layers=tuple(LayerChoice(f"blocks.{i}", tuple(o)) for i, o in enumerate(layers)),
        model="test_local_vim",
    )


def test_arch_round_trip_and_canonical_order(tmp_path) -> None:
    s = load_space("localmamba")
    arch = _arch(s, [["w2", "h", "v_flip", "w7"], ["h", "h_flip", "v", "v_flip"]])
    assert arch.layers[0].orders == ("h", "v_flip", "w2", "w7")
    path = save_arch(arch, tmp_path / "arch.yaml")
    again = load_arch(path)
    assert again.orders == arch.orders and again.space == s and again.model == "test_local_vim"
    with pytest.raises(ValueError, match="exists"):
        save_arch(arch, path)
    save_arch(arch, path, overwrite=True)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d.update(format_version=99), "format_version 99"),
        (lambda d: d["layers"][0].update(orders=["h", "h_flip", "v", "q"]), "'q' is not a candidate"),
        (lambda d: d["layers"][0].update(orders=["h", "h_flip", "v", "w3"]), "not a candidate"),
        (lambda d: d["layers"][0].update(orders=["h", "h_flip", "v"]), "keeps k=4"),
        (lambda d: d["layers"][0].update(probs=[0.5, 0.5]), "2 probabilities"),
        (lambda d: d.update(layerz=[]), "did you mean 'layers'"),
        (lambda d: d["layers"][1].update(order=["h"]), "did you mean 'orders'"),
    ],
)
def test_arch_errors(mutate, match) -> None:
    d = _arch(load_space("localmamba"), [["h", "h_flip", "v", "v_flip"]] * 2).to_dict()
    mutate(d)
    with pytest.raises(ValueError, match=match) as e:
        load_arch(d)
    assert "\n" not in str(e.value)


def test_arch_compatibility_checks(tmp_path) -> None:
    s = load_space("localmamba")
    arch = _arch(s, [["h", "h_flip", "v", "v_flip"]] * 3)
    arch.check_compatible(["blocks.0", "blocks.1", "blocks.2"], s)
    with pytest.raises(ValueError, match="3 layers but m has 4"):
        arch.check_compatible([f"blocks.{i}" for i in range(4)], s, model="m")
    with pytest.raises(ValueError, match="labelled"):
        arch.check_compatible(["blocks.0", "blocks.1", "stages.0"], s)
    with pytest.raises(ValueError, match="uses space 'localmamba'"):
        arch.check_compatible(["blocks.0", "blocks.1", "blocks.2"], load_space("vmamba"))
    with pytest.raises(ValueError, match="arch file not found"):
        load_arch(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("layers: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_arch(tmp_path / "bad.yaml")
