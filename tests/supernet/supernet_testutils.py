"""Helpers shared by the model tests: entrypoint lists, an example arch per derived entrypoint, a builder."""

from __future__ import annotations

import timm
import torch

import supernet
from search_spaces import ArchSpec

ALL_NAMES = supernet.list_models()
TEST_NAMES = [n for n in ALL_NAMES if n.startswith("test_")]
MINI_NAMES = [n for n in ALL_NAMES if "_mini" in n]
TINY_NAMES = [n for n in ALL_NAMES if "_tiny" in n or "_small" in n]
SMALL_NAMES = TEST_NAMES + MINI_NAMES


def is_derived(name: str) -> bool:
    return f"{name}_search" in ALL_NAMES


def example_arch(name: str, seed: int = 0, **kwargs) -> ArchSpec:
    """An arch for derived entrypoint ``name``: its supernet's top-k at a fixed seed."""
    torch.manual_seed(seed)
    return supernet.derive_arch(timm.create_model(f"{name}_search", **kwargs))


def build(name: str, **kwargs) -> torch.nn.Module:
    """Any of our entrypoints; derived ones get :func:`example_arch` unless ``arch`` is given."""
    if is_derived(name) and "arch" not in kwargs:
        kwargs["arch"] = example_arch(name)
    return timm.create_model(name, **kwargs)


def small_size(name: str) -> int:
    """A fast input size for a small entrypoint (the minis at their smallest target resolution)."""
    return 16 if name.startswith("test_") else 32
