"""Token orders: exact permutations of an H×W grid.

An order for an H×W grid is a LongTensor ``order`` of length ``L = H * W``; ``order[t]`` is the row-major token index
(``i * W + j``) visited at scan step ``t``. Every order is a permutation: border windows are clipped, never padded.

The registry below is the only place where order names are known. Names are built from these patterns:

========== ==============================================================================================
``h``      row-major
``v``      column-major
``w{k}``   k×k windows tiled from the top-left, windows row-major, row-major inside each (any k >= 2)
``wv{k}``  the transpose rule: windows column-major, column-major inside each window (any k >= 2)
``zh``     snake over rows: even rows left→right, odd rows right→left
``zv``     snake over columns: even columns top→bottom, odd columns bottom→top
``*_flip`` the same order reversed
========== ==============================================================================================
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "ORDER_PATTERNS",
    "apply_order",
    "coinciding_orders",
    "inverse_order",
    "is_global_order",
    "is_permutation",
    "order_grid",
    "parse_order_name",
    "scan_order",
    "undo_order",
    "validate_order_name",
]


def _grid(height: int, width: int) -> torch.Tensor:
    return torch.arange(height * width, dtype=torch.long).view(height, width)


def _row_major(height: int, width: int) -> torch.Tensor:
    return torch.arange(height * width, dtype=torch.long)


def _col_major(height: int, width: int) -> torch.Tensor:
    return _grid(height, width).t().reshape(-1)


def _windows(height: int, width: int, k: int) -> torch.Tensor:
    """k×k windows tiled from the top-left; border windows are clipped to the grid."""
    grid = _grid(height, width)
    parts = [grid[i : i + k, j : j + k].reshape(-1) for i in range(0, height, k) for j in range(0, width, k)]
    return torch.cat(parts)


def _windows_transposed(height: int, width: int, k: int) -> torch.Tensor:
    """``w{k}`` on the transposed (W×H) grid, mapped back to this grid's row-major ids."""
    t_order = _windows(width, height, k)  # ids on the transposed grid: i' * H + j' with i' < W, j' < H
    i_t, j_t = t_order // height, t_order % height
    return j_t * width + i_t


def _snake_rows(height: int, width: int) -> torch.Tensor:
    grid = _grid(height, width).clone()
    grid[1::2] = grid[1::2].flip(1)
    return grid.reshape(-1)


def _snake_cols(height: int, width: int) -> torch.Tensor:
    grid = _grid(height, width).t().clone()
    grid[1::2] = grid[1::2].flip(1)
    return grid.reshape(-1)


@dataclass(frozen=True)
class _Pattern:
    regex: str
    doc: str
    build: Callable[..., torch.Tensor]
    is_global: bool


# The registry: the one place where candidate scan orders are declared.
ORDER_PATTERNS: dict[str, _Pattern] = {
    "h": _Pattern(r"h", "row-major", lambda h, w: _row_major(h, w), True),
    "v": _Pattern(r"v", "column-major", lambda h, w: _col_major(h, w), True),
    "zh": _Pattern(r"zh", "snake over rows", lambda h, w: _snake_rows(h, w), True),
    "zv": _Pattern(r"zv", "snake over columns", lambda h, w: _snake_cols(h, w), True),
    "w{k}": _Pattern(r"w([0-9]+)", "k×k windows, row-major (k >= 2)", lambda h, w, k: _windows(h, w, k), False),
    "wv{k}": _Pattern(
        r"wv([0-9]+)", "k×k windows, column-major (k >= 2)", lambda h, w, k: _windows_transposed(h, w, k), False
    ),
}
_FLIP = "_flip"


def _valid_patterns_text() -> str:
    return ", ".join(ORDER_PATTERNS) + f", each optionally with '{_FLIP}'"


def parse_order_name(name: str) -> tuple[str, tuple[int, ...], bool]:
    """Split an order name into (pattern key, integer parameters, flipped).

    Raises:
        ValueError: the name matches no registered pattern, or a window size is < 2.
    """
    if not isinstance(name, str):
        raise ValueError(
            f"scan order name must be a string, got {type(name).__name__}; valid: {_valid_patterns_text()}"
        )
    base, flip = (name[: -len(_FLIP)], True) if name.endswith(_FLIP) else (name, False)
    for key, pat in ORDER_PATTERNS.items():
        m = re.fullmatch(pat.regex, base)
        if m is None:
            continue
        params = tuple(int(g) for g in m.groups())
        if any(p < 2 for p in params) or any(g.startswith("0") for g in m.groups()):
            raise ValueError(f"scan order '{name}': window size must be an integer >= 2 without leading zeros")
        return key, params, flip
    raise ValueError(f"unknown scan order '{name}'; valid patterns: {_valid_patterns_text()}")


def validate_order_name(name: str) -> str:
    """Return ``name`` if it is a valid order name, else raise ``ValueError``."""
    parse_order_name(name)
    return name


def is_global_order(name: str) -> bool:
    """True for orders that traverse the whole grid line by line (h, v, zh, zv and flips), False for windowed ones."""
    key, _, _ = parse_order_name(name)
    return ORDER_PATTERNS[key].is_global


@functools.lru_cache(maxsize=1024)
def _cached_order(name: str, height: int, width: int) -> torch.Tensor:
    key, params, flip = parse_order_name(name)
    order = ORDER_PATTERNS[key].build(height, width, *params)
    if flip:
        order = order.flip(0)
    order = order.contiguous()
    order.requires_grad_(False)
    return order


def scan_order(name: str, height: int, width: int) -> torch.Tensor:
    """The scan order ``name`` on an ``height``×``width`` grid.

    Args:
        name: an order name (see the module docstring), e.g. ``"h"``, ``"w7_flip"``, ``"wv3"``.
        height: grid rows H >= 1.
        width: grid columns W >= 1.

    Returns:
        LongTensor (H*W,): ``order[t]`` is the row-major token index visited at step t. A fresh copy of a cached tensor.
    """
    for what, n in (("height", height), ("width", width)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"scan order grid {what} must be an integer >= 1, got {n!r}")
    parse_order_name(name)  # a name that is no string fails here, in words, not as a cache key
    return _cached_order(name, height, width).clone()


def is_permutation(order: torch.Tensor, length: int | None = None) -> bool:
    """True when ``order`` (L,) holds every integer of ``0..L-1`` exactly once."""
    if order.dim() != 1:
        return False
    n = order.numel() if length is None else length
    if order.numel() != n:
        return False
    return bool(torch.equal(torch.sort(order.long()).values, torch.arange(n, device=order.device)))


def _as_order(order: Any, what: str) -> torch.Tensor:
    """``order`` as a 1-D integer tensor (a list or tuple of ints too), else a one-line ValueError naming ``what``."""
    if not isinstance(order, torch.Tensor):
        try:
            order = torch.as_tensor(order)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{what}: expected an order, a 1-D tensor (or list) of token indices") from None
    if order.dim() != 1 or order.is_floating_point() or order.is_complex() or order.dtype == torch.bool:
        raise ValueError(f"{what}: expected a 1-D integer order, got {order.dtype} of shape {tuple(order.shape)}")
    return order


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: ``inverse_order(o)[o[t]] == t``.

    Raises:
        ValueError: ``order`` is not a permutation of ``0..L-1`` (the inverse would be undefined).
    """
    order = _as_order(order, "inverse_order")
    if not is_permutation(order):
        raise ValueError(f"inverse_order: the order is not a permutation of 0..{order.numel() - 1} (each index once)")
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    return inv


def apply_order(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Reorder tokens into scan order: ``x`` (B, L, ...) → (B, L, ...) with ``out[:, t] = x[:, order[t]]``."""
    order = _as_order(order, "apply_order")
    if x.shape[1] != order.numel():
        raise ValueError(f"apply_order: x has {x.shape[1]} tokens on dim 1 but the order has {order.numel()}")
    return x.index_select(1, order.to(x.device))


def undo_order(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Undo :func:`apply_order`: scan-ordered (B, L, ...) back to row-major token order (``order`` a permutation)."""
    order = _as_order(order, "undo_order")
    if x.shape[1] != order.numel():
        raise ValueError(f"undo_order: x has {x.shape[1]} tokens on dim 1 but the order has {order.numel()}")
    return x.index_select(1, inverse_order(order.to(x.device)))


def coinciding_orders(names: Sequence[str], height: int, width: int) -> list[tuple[str, str]]:
    """Pairs of names that give the same permutation on an ``height``×``width`` grid (e.g. ``w7`` and ``h`` on 7×7).

    A search over such a pair splits probability between identical scans, and a child keeping both scans twice.
    """
    seen: dict[tuple[int, ...], str] = {}
    pairs = []
    for name in names:
        key = tuple(_cached_order(name, height, width).tolist())
        if key in seen:
            pairs.append((seen[key], name))
        else:
            seen[key] = name
    return pairs


def order_grid(name: str, height: int, width: int) -> torch.Tensor:
    """(H, W) grid whose cell holds the scan step at which that cell is visited."""
    return inverse_order(scan_order(name, height, width)).view(height, width)
