"""From a supernet to its children: the arch of the current probabilities, building a child, slicing weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn

from search_spaces import ArchSpec, LayerChoice, load_arch, select_top_k

from .mixer import slice_mixer_state

__all__ = ["create_derived", "derive_arch", "list_models", "load_supernet_weights", "supernet_state_for_child"]


def list_models() -> list[str]:
    """Every timm entrypoint this package registers (import :mod:`supernet` first, which registers them)."""
    from timm.models import model_entrypoint

    return [n for n in timm.list_models() if model_entrypoint(n).__module__.startswith("supernet.")]


def derive_arch(model: nn.Module, k: int | None = None, provenance: dict[str, Any] | None = None) -> ArchSpec:
    """The arch of a supernet's current probabilities: per layer, the space's top-k (constraint-aware) orders.

    Args:
        model: a search model (has ``arch_probs()``, ``search_space`` and ``derived_model_name``).
        k: orders per layer (default: the space's k).
        provenance: recorded as is in the arch.

    Returns:
        An :class:`ArchSpec` whose ``model`` is the supernet's derived entrypoint.
    """
    probs = model.arch_probs()
    if not probs:
        raise ValueError(f"derive_arch: {type(model).__name__} has no arch_logits (not a search model)")
    space = model.search_space
    if k is not None and k != space.k:
        space = dataclasses.replace(space, k=k)
    layers = tuple(
        LayerChoice(label, tuple(select_top_k(space, p.tolist())), tuple(float(x) for x in p))
        for label, p in probs.items()
    )
    return ArchSpec(space=space, layers=layers, model=model.derived_model_name, provenance=dict(provenance or {}))


def create_derived(arch: str | Path | dict | ArchSpec, **kwargs: Any) -> nn.Module:
    """Build the child an arch describes: ``timm.create_model(arch.model, arch=arch, **kwargs)``."""
    spec = load_arch(arch)
    if not spec.model:
        raise ValueError("arch has no 'model' (the derived entrypoint, e.g. local_vim_tiny); add it to the arch file")
    return timm.create_model(spec.model, arch=spec, **kwargs)


def supernet_state_for_child(supernet: nn.Module, child: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict for ``child`` made of ``supernet``'s weights: each layer's per-order tensors are the rows of the
    child's orders, every other tensor is copied. Both models must have the same labels and widths.

    Raises:
        ValueError: layers, orders, keys or shapes do not line up (the message names the first mismatch).
    """
    src = supernet.state_dict()
    dst = child.state_dict()
    src_mixers = dict(supernet.named_mixers())
    out: dict[str, torch.Tensor] = {}
    for label, mixer in child.named_mixers():
        if label not in src_mixers:
            raise ValueError(f"child layer '{label}' has no counterpart in the supernet")
        out.update(slice_mixer_state(src, f"{label}.mixer.", src_mixers[label].order_names, mixer.order_names))
    for key, val in dst.items():
        if key not in out:
            if key not in src:
                raise ValueError(f"child weight '{key}' is missing from the supernet")
            out[key] = src[key]
        if out[key].shape != val.shape:
            raise ValueError(
                f"'{key}': supernet gives {tuple(out[key].shape)}, child needs {tuple(val.shape)}; "
                f"slicing needs a supernet of the child's widths"
            )
    return out


def load_supernet_weights(child: nn.Module, supernet: nn.Module) -> nn.Module:
    """Initialise ``child`` in place from ``supernet`` (see :func:`supernet_state_for_child`); returns ``child``."""
    child.load_state_dict(supernet_state_for_child(supernet, child), strict=True)
    return child
