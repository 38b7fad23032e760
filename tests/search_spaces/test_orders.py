"""Scan orders: permutation property, hand-checked grids, flips, transposes, apply/undo round trips."""

from __future__ import annotations

import pytest
import torch

from search_spaces import (
    apply_order,
    inverse_order,
    is_global_order,
    is_permutation,
    order_grid,
    parse_order_name,
    scan_order,
    undo_order,
)
from search_spaces.__main__ import format_grid
from search_spaces.__main__ import main as cli_main

SIZES = [(1, 1), (1, 7), (7, 1), (2, 2), (3, 3), (7, 9), (9, 7), (14, 16), (13, 13), (5, 12)]
BASES = ["h", "v", "zh", "zv"] + [f"{p}{k}" for p in ("w", "wv") for k in (2, 3, 4, 7)]
NAMES = BASES + [f"{b}_flip" for b in BASES]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_order_is_a_permutation(name: str, size: tuple[int, int]) -> None:
    h, w = size
    order = scan_order(name, h, w)
    assert order.dtype == torch.long and order.shape == (h * w,)
    assert is_permutation(order, h * w)


# Hand-checked small grids; token ids are row-major 0..H*W-1.
HAND = {
    ("h", 2, 3): [0, 1, 2, 3, 4, 5],
    ("v", 2, 3): [0, 3, 1, 4, 2, 5],
    ("v", 3, 2): [0, 2, 4, 1, 3, 5],
    ("w2", 3, 3): [0, 1, 3, 4, 2, 5, 6, 7, 8],  # the example of the design doc
    ("w2", 2, 5): [0, 1, 5, 6, 2, 3, 7, 8, 4, 9],
    ("w3", 4, 4): [0, 1, 2, 4, 5, 6, 8, 9, 10, 3, 7, 11, 12, 13, 14, 15],
    ("wv2", 3, 3): [0, 3, 1, 4, 6, 7, 2, 5, 8],
    ("wv2", 2, 5): [0, 5, 1, 6, 2, 7, 3, 8, 4, 9],
    ("zh", 3, 3): [0, 1, 2, 5, 4, 3, 6, 7, 8],
    ("zv", 3, 3): [0, 3, 6, 7, 4, 1, 2, 5, 8],
    ("zv", 2, 3): [0, 3, 4, 1, 2, 5],
    ("h_flip", 2, 2): [3, 2, 1, 0],
    ("v_flip", 2, 3): [5, 2, 4, 1, 3, 0],
    ("w7", 3, 4): list(range(12)),  # a window larger than the grid is one clipped window
}


@pytest.mark.parametrize("key", list(HAND), ids=lambda k: f"{k[0]}-{k[1]}x{k[2]}")
def test_hand_checked(key: tuple[str, int, int]) -> None:
    name, h, w = key
    assert scan_order(name, h, w).tolist() == HAND[key]


@pytest.mark.parametrize("name", BASES)
@pytest.mark.parametrize("size", [(7, 9), (4, 6), (1, 5)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_flip_is_reverse(name: str, size: tuple[int, int]) -> None:
    assert torch.equal(scan_order(f"{name}_flip", *size), scan_order(name, *size).flip(0))


@pytest.mark.parametrize("k", [2, 3, 4, 7])
@pytest.mark.parametrize("size", [(7, 9), (14, 16), (13, 13), (1, 6), (5, 2)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_wv_is_w_on_transposed_grid(k: int, size: tuple[int, int]) -> None:
    h, w = size
    t_order = scan_order(f"w{k}", w, h)  # ids on the transposed (W×H) grid
    ids_t = torch.arange(h * w).view(h, w).t().reshape(-1)  # transposed-grid id -> original id
    assert torch.equal(scan_order(f"wv{k}", h, w), ids_t[t_order])


def test_v_is_h_on_transposed_grid() -> None:
    h, w = 5, 8
    ids_t = torch.arange(h * w).view(h, w).t().reshape(-1)
    assert torch.equal(scan_order("v", h, w), ids_t[scan_order("h", w, h)])


def test_windows_are_contiguous_blocks() -> None:
    # Every k*k run of a w{k} order (on a divisible grid) covers exactly one k×k block.
    h, w, k = 8, 12, 4
    order = scan_order(f"w{k}", h, w).view(-1, k * k)
    for block in order:
        rows, cols = block // w, block % w
        assert rows.max() - rows.min() == k - 1 and cols.max() - cols.min() == k - 1


def test_cached_but_not_shared() -> None:
    a = scan_order("w3", 5, 5)
    a[0] = 99
    assert scan_order("w3", 5, 5)[0] == 0


@pytest.mark.parametrize("bad", ["", "x", "w1", "w0", "w", "wv", "h_flip_flip", "W2", "w02", "hflip", "w2x"])
def test_bad_names(bad: str) -> None:
    with pytest.raises(ValueError, match="scan order"):
        scan_order(bad, 4, 4)


def test_bad_name_lists_valid_patterns() -> None:
    with pytest.raises(ValueError) as e:
        parse_order_name("diag")
    assert "w{k}" in str(e.value) and "_flip" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("h,w", [(0, 3), (3, -1), (2.5, 3)])
def test_bad_sizes(h, w) -> None:
    with pytest.raises(ValueError, match="grid"):
        scan_order("h", h, w)


def test_global_vs_windowed() -> None:
    assert all(is_global_order(n) for n in ["h", "v_flip", "zh", "zv_flip"])
    assert not any(is_global_order(n) for n in ["w2", "wv7_flip", "w3"])


@pytest.mark.parametrize("name", ["h", "v_flip", "w3", "wv2_flip", "zh"])
def test_apply_undo_round_trip(name: str) -> None:
    h, w = 5, 7
    x = torch.randn(3, h * w, 4, 2)
    order = scan_order(name, h, w)
    y = apply_order(x, order)
    assert torch.equal(y[:, 0], x[:, order[0]]) and torch.equal(y[:, -1], x[:, order[-1]])
    assert torch.equal(undo_order(y, order), x)
    assert torch.equal(inverse_order(order)[order], torch.arange(h * w))


def test_apply_length_mismatch() -> None:
    with pytest.raises(ValueError, match="tokens"):
        apply_order(torch.zeros(2, 10, 3), scan_order("h", 3, 3))


def test_order_grid_and_cli(capsys) -> None:
    grid = order_grid("w2", 4, 6)
    assert grid.shape == (4, 6) and grid[0].tolist() == [0, 1, 4, 5, 8, 9]
    assert format_grid("w2", 2, 2).splitlines() == ["0 1", "2 3"]
    assert cli_main(["show", "v", "--size", "2x3"]) == 0
    out = capsys.readouterr().out
    assert "0 2 4" in out and "1 3 5" in out
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    assert "localmamba" in out and "w{k}" in out
    assert cli_main(["show", "q9", "--size", "2x2"]) == 2
    captured = capsys.readouterr()
    assert "unknown scan order" in captured.err and captured.out == ""  # no header for a name that does not exist


@pytest.mark.parametrize("argv", [["show", "w2", "--size", "4by6"], ["bogus"], ["show"]])
def test_cli_usage_errors_are_one_line(argv, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_inverse_and_undo_refuse_a_non_permutation_and_take_lists() -> None:
    """A repeated or out-of-range index left part of the inverse uninitialised (different garbage each call)."""
    from search_spaces import apply_order, inverse_order, undo_order

    x = torch.arange(6.0).view(1, 6, 1)
    for bad in ([0, 0, 1, 2, 3, 4], [-1, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 6]):
        with pytest.raises(ValueError, match=r"not a permutation of 0..5"):
            inverse_order(torch.tensor(bad))
        with pytest.raises(ValueError, match=r"not a permutation of 0..5"):
            undo_order(x, torch.tensor(bad))
    order = [5, 3, 1, 0, 2, 4]
    assert torch.equal(undo_order(apply_order(x, order), order), x)
    with pytest.raises(ValueError, match=r"apply_order: expected a 1-D integer order"):
        apply_order(x, torch.tensor([0.0, 1.0]))


def test_order_names_are_ascii_strings() -> None:
    from search_spaces import SearchSpace

    with pytest.raises(ValueError, match="scan order name must be a string, got list"):
        scan_order(["h"], 2, 3)
    with pytest.raises(ValueError, match="unknown scan order 'w\uff13'"):  # a fullwidth 3 read as w3 before
        scan_order("w\uff13", 3, 3)
    with pytest.raises(ValueError, match=r"min_global=True is out of range"):
        SearchSpace(name="s", candidates=("h", "w2"), k=2, min_global=True)
