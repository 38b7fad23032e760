"""``torch.compile`` for this package's models: Inductor with its layout optimization off.

Inductor's layout optimization turns a graph with several convolutions to channels-last: every dense 4-D tensor
upstream of a convolution that the backward keeps is stored channels-last. The hierarchical family has a depthwise conv
in every block, so the mixers' (B, L, K, D) scan operands kept for the backward (u, delta) were stored that way too,
and each went back by a copy to the layout the registered scan op takes, in the forward and again in the backward.
vmamba_tiny on an H200 (bf16, batch 128, CUDA-graph replay of the compiled step): 51.7 ms per step with the
optimization, 37.9 ms without it, same run; 42.3 ms uncompiled in another run. The depthwise convs' inputs are
channels-last in eager mode already, and Inductor keeps eager strides with the optimization off. The plain family
has one convolution (the patch embedding), too few for Inductor to turn the optimization on.
"""

from __future__ import annotations

import torch

from .mixer import MultiOrderMixer

__all__ = ["compile_model", "compile_options"]


def compile_options(model: torch.nn.Module, mode: str | None = None) -> dict:
    """``torch.compile`` keyword arguments for ``model`` in ``mode`` (None or ``"default"``, ``"reduce-overhead"``,
    ``"max-autotune"``, ...): ``{"mode": mode}`` for other models; for one holding a :class:`MultiOrderMixer`, the
    mode's Inductor options plus ``layout_optimization=False`` (torch.compile takes a mode or options, not both)."""
    if not any(isinstance(m, MultiOrderMixer) for m in model.modules()):
        return {"mode": mode}
    import torch._inductor

    options = dict(torch._inductor.list_mode_options(mode or "default"))
    options["layout_optimization"] = False
    return {"options": options}


def compile_model(model: torch.nn.Module, mode: str | None = None):
    """``torch.compile(model, ...)`` with :func:`compile_options`."""
    return torch.compile(model, **compile_options(model, mode))
