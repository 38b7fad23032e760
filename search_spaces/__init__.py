"""Scan orders as exact permutations of an H×W grid, search spaces built from them, and the arch file."""

from .arch import ARCH_FORMAT_VERSION, ArchSpec, LayerChoice, load_arch, save_arch
from .orders import (
    ORDER_PATTERNS,
    apply_order,
    coinciding_orders,
    inverse_order,
    is_global_order,
    is_permutation,
    order_grid,
    parse_order_name,
    scan_order,
    undo_order,
    validate_order_name,
)
from .space import SearchSpace, list_presets, load_space, select_top_k

__all__ = [
    "ARCH_FORMAT_VERSION",
    "ORDER_PATTERNS",
    "ArchSpec",
    "LayerChoice",
    "SearchSpace",
    "apply_order",
    "coinciding_orders",
    "inverse_order",
    "is_global_order",
    "is_permutation",
    "list_presets",
    "load_arch",
    "load_space",
    "order_grid",
    "parse_order_name",
    "save_arch",
    "scan_order",
    "select_top_k",
    "undo_order",
    "validate_order_name",
]
