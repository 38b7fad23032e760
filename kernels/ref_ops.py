"""The reference ops as registered ops, for the ``ref`` backend (and ``mamba``'s scan) under a dispatch mode.

In plain eager mode and under torch.compile the ``ref`` backend runs :mod:`kernels.reference` as plain PyTorch ops:
they are the truth, differentiable to any order, and Inductor fuses them. Under a dispatch mode (``FlopCounterMode``,
``FakeTensorMode``) those plain ops would be seen one by one: ``FlopCounterMode`` would count the scan's per-step
einsums instead of VMamba's rule and count the conv and the gate not at all, so a CPU count would not match the count
of the same model on the Triton ops. There, ``kernels.ops`` calls these ops instead. Each is one dispatcher call whose
implementation is the reference and whose FLOP formula is the Triton op's, so ``FlopCounterMode`` counts a model the
same way on every backend. The backward is a registered op too: autograd through the reference, recomputed from the
saved inputs (counted as nothing, like the Triton backward ops). A backward that must itself be differentiable
(``create_graph=True``) or batched (``is_grads_batched``) runs that autograd as plain ops instead, and forward-mode AD
and ``torch.func`` transforms never take these ops, so the plain reference's derivatives of every order stay
available. Not supported: non-reentrant activation checkpointing whose forward and recompute run one inside a dispatch
mode and one outside (the two then save different tensors; the mixer's projections already did so before). The
``mamba`` backend's scan (mamba-ssm's CUDA kernel, which no dispatch mode can see into) runs through the same scan
op, with mamba-ssm inside.

Registered ops (namespace ``scan_nas``), with ``*_ref_bwd`` backward ops taking the output gradient, the forward's
inputs and which inputs need a gradient, and returning one gradient per tensor input (empty where none is wanted):
    selective_scan_counted(u, delta, A, B, C, D?, z?, delta_bias?, orders?, delta_softplus, out_dtype?, backend) -> y
        (backend ``ref`` or ``mamba``)
    causal_conv1d_ref(x, weight, bias?, orders?, silu, out_dtype?) -> out
    gated_branch_merge_ref(y, w, z) -> out
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import register_flop_formula

from .flop_rules import conv_flops, counter_flops, gate_flops, scan_flops
from .library import conv_fwd_fake
from .reference import branch_merge_ref, causal_conv1d_ref, selective_scan_ref

__all__ = [
    "causal_conv1d_counted",
    "counted_dispatch",
    "flop_counting",
    "gated_branch_merge_counted",
    "selective_scan_counted",
]

Tensor = torch.Tensor


def counted_dispatch() -> bool:
    """Whether the ``ref`` backend should run as registered ops: a dispatch mode is active (``FlopCounterMode``,
    ``FakeTensorMode``), outside torch.compile's tracing, ``torch.func`` transforms and forward-mode AD (which keep
    the plain ops: the registered ops have no vmap or forward-AD rule)."""
    # is_compiling first: Dynamo reads it as a constant and skips the rest, which it could not trace
    return (
        not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() > 0
        and not torch._C._are_functorch_transforms_active()
        and getattr(torch.autograd.forward_ad, "_current_level", -1) < 0  # inside forward_ad.dual_level(): >= 0
    )


def flop_counting() -> bool:
    """Whether a ``FlopCounterMode`` is counting (outside torch.compile, ``torch.func`` and forward-mode AD): the mixer
    then leaves its projections unpadded, so the count sees the model's own GEMMs. Other dispatch modes (selective
    activation checkpointing's, for one) keep the padded, faster GEMMs."""
    if not counted_dispatch():
        return False
    from torch.utils import flop_counter
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    kinds = tuple(k for k in (getattr(flop_counter, "_FlopCounterMode", None), flop_counter.FlopCounterMode) if k)
    return any(isinstance(mode, kinds) for mode in _get_current_dispatch_mode_stack())


def _vjp(fn: Callable, tensors: list, rest: tuple, dout: Tensor, needs: list[bool], create_graph: bool = False):
    """Gradients of ``fn(*tensors, *rest)`` for the tensors flagged in ``needs`` (None for the others), by autograd
    through the reference taken from fresh aliases of those inputs: the op's own partial derivatives, not also the
    paths from one input into another (delta and B are projections of u in a mixer), which an outer backward follows
    itself."""
    with torch.enable_grad():
        args = [
            (t.view_as(t) if t.requires_grad else t.detach().requires_grad_()) if t is not None and need else t
            for t, need in zip(tensors, needs)
        ]
        out = fn(*args, *rest)
    wanted = [t for t, need in zip(args, needs) if t is not None and need]
    grads = iter(torch.autograd.grad(out, wanted, dout, create_graph=create_graph, allow_unused=True) if wanted else ())
    result = []
    for t, need in zip(args, needs):
        g = next(grads) if t is not None and need else None
        result.append(torch.zeros_like(t) if g is None and t is not None and need else g)
    return result


def _reference_vjp(fn: Callable, tensors: list, rest: tuple, dout: Tensor, needs: list[bool]) -> list[Tensor]:
    """:func:`_vjp` inside a backward op's implementation, with an empty tensor for every gradient not asked for."""
    # An op's implementation runs with the autograd dispatch keys excluded, where no graph is recorded: lift that
    # for the recompute (the guard restores the keys after it), and inference mode, whose tensors autograd cannot save.
    with torch._C._PreserveDispatchKeyGuard(), torch.inference_mode(False):
        torch._C._dispatch_tls_set_dispatch_key_excluded(torch._C.DispatchKey.AutogradFunctionality, False)
        torch._C._dispatch_tls_set_dispatch_key_excluded(torch._C.DispatchKey.ADInplaceOrView, False)
        grads = _vjp(fn, tensors, rest, dout, needs)
    return [dout.new_empty((0,)) if g is None else g for g in grads]


def _fake_grads(tensors: list, needs: list[bool], like: Tensor) -> list[Tensor]:
    return [t.new_empty(t.shape) if t is not None and need else like.new_empty((0,)) for t, need in zip(tensors, needs)]


def _backward(ctx, bwd_op, fn: Callable, tensors: list, rest: tuple, dout: Tensor) -> list[Tensor | None]:
    """A counted op's input gradients (None where none is needed): through its registered backward op, or, where the
    backward must itself be differentiable (grad mode on: ``create_graph``) or batched (``is_grads_batched``, a
    ``torch.func`` transform), through autograd of the reference on the saved inputs, as plain ops."""
    needs = [bool(x) for x in ctx.needs_input_grad[: len(tensors)]]
    # is_grads_batched vmaps the backward with autograd's own batching, whose tensors carry the "Batched" key (which
    # Python's DispatchKey enum does not name); torch.func's carry FuncTorchBatched
    batched = "Batched" in repr(torch._C._dispatch_keys(dout))
    if torch.is_grad_enabled() or batched or torch._C._are_functorch_transforms_active():
        return _vjp(fn, tensors, rest, dout, needs, create_graph=torch.is_grad_enabled())
    grads = bwd_op(dout, *tensors, *rest, needs)
    return [g if need else None for g, need in zip(grads, needs)]


# ---------------------------------------------------------------------------------------------- selective scan


def _scan_impl(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, orders: Tensor | None, delta_softplus: bool, out_dtype: torch.dtype | None,
    backend: str,
) -> Tensor:  # fmt: skip
    if backend == "mamba":
        from .mamba_backend import selective_scan_mamba as scan
    else:
        scan = selective_scan_ref
    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, orders, out_dtype)


_scan_op = torch.library.custom_op("scan_nas::selective_scan_counted", _scan_impl, mutates_args=())


@_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, orders, delta_softplus, out_dtype, backend):
    return delta.new_empty(delta.shape, dtype=out_dtype or u.dtype)


def _scan_bwd_impl(
    dy: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, orders: Tensor | None, delta_softplus: bool, out_dtype: torch.dtype | None,
    backend: str, needs: list[bool],
) -> list[Tensor]:  # fmt: skip
    tensors = [u, delta, A, B, C, D, z, delta_bias]
    return _reference_vjp(_scan_impl, tensors, (orders, delta_softplus, out_dtype, backend), dy, needs)


_scan_bwd_op = torch.library.custom_op("scan_nas::selective_scan_counted_bwd", _scan_bwd_impl, mutates_args=())


@_scan_bwd_op.register_fake
def _(dy, u, delta, A, B, C, D, z, delta_bias, orders, delta_softplus, out_dtype, backend, needs):
    return _fake_grads([u, delta, A, B, C, D, z, delta_bias], needs, dy)


def _scan_setup_context(ctx, inputs, output):
    *tensors, orders, delta_softplus, out_dtype, backend = inputs
    ctx.save_for_backward(*tensors, orders)
    ctx.rest = (delta_softplus, out_dtype, backend)


def _scan_backward(ctx, dy):
    *tensors, orders = ctx.saved_tensors
    return (*_backward(ctx, _scan_bwd_op, _scan_impl, tensors, (orders, *ctx.rest), dy), None, None, None, None)


_scan_op.register_autograd(_scan_backward, setup_context=_scan_setup_context)


@register_flop_formula(torch.ops.scan_nas.selective_scan_counted)
def _scan_flop_formula(u, delta, A, B, C, D, z, *args, out_shape=None, **kwargs) -> int:
    return counter_flops(scan_flops(delta, A, D is not None, z is not None))


def selective_scan_counted(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, orders=None,
                           out_dtype=None, backend="ref") -> Tensor:  # fmt: skip
    """:func:`kernels.reference.selective_scan_ref` (``backend="ref"``) or
    :func:`kernels.mamba_backend.selective_scan_mamba` (``"mamba"``) as one registered op (same arguments)."""
    return _scan_op(u, delta, A, B, C, D, z, delta_bias, orders, bool(delta_softplus), out_dtype, backend)


# ---------------------------------------------------------------------------------------------- causal conv1d


def _conv_impl(
    x: Tensor, weight: Tensor, bias: Tensor | None, orders: Tensor | None, silu: bool, out_dtype: torch.dtype | None
) -> Tensor:
    return causal_conv1d_ref(x, weight, bias, orders, "silu" if silu else None, out_dtype)


_conv_op = torch.library.custom_op("scan_nas::causal_conv1d_ref", _conv_impl, mutates_args=())


_conv_op.register_fake(conv_fwd_fake)


def _conv_bwd_impl(
    dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, orders: Tensor | None, silu: bool,
    out_dtype: torch.dtype | None, needs: list[bool],
) -> list[Tensor]:  # fmt: skip
    return _reference_vjp(_conv_impl, [x, weight, bias], (orders, silu, out_dtype), dout, needs)


_conv_bwd_op = torch.library.custom_op("scan_nas::causal_conv1d_ref_bwd", _conv_bwd_impl, mutates_args=())


@_conv_bwd_op.register_fake
def _(dout, x, weight, bias, orders, silu, out_dtype, needs):
    return _fake_grads([x, weight, bias], needs, dout)


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, orders, silu, out_dtype = inputs
    ctx.save_for_backward(x, weight, bias, orders)
    ctx.rest = (silu, out_dtype)


def _conv_backward(ctx, dout):
    x, weight, bias, orders = ctx.saved_tensors
    return (*_backward(ctx, _conv_bwd_op, _conv_impl, [x, weight, bias], (orders, *ctx.rest), dout), None, None, None)


_conv_op.register_autograd(_conv_backward, setup_context=_conv_setup_context)


@register_flop_formula(torch.ops.scan_nas.causal_conv1d_ref)
def _conv_flop_formula(x, weight, *args, out_shape=None, **kwargs) -> int:
    return counter_flops(conv_flops(x, weight))


def causal_conv1d_counted(x, weight, bias=None, orders=None, activation="silu", out_dtype=None) -> Tensor:
    """:func:`kernels.reference.causal_conv1d_ref` as one registered op (same arguments)."""
    return _conv_op(x, weight, bias, orders, activation == "silu", out_dtype)


# ---------------------------------------------------------------------------------------------- gated merge


def _gated_merge_impl(y: Tensor, w: Tensor, z: Tensor) -> Tensor:
    return branch_merge_ref(y, w, z)


_gated_merge_op = torch.library.custom_op("scan_nas::gated_branch_merge_ref", _gated_merge_impl, mutates_args=())


@_gated_merge_op.register_fake
def _(y, w, z):
    return y.new_empty((y.shape[0], y.shape[1], y.shape[3]))


def _gated_merge_bwd_impl(dout: Tensor, y: Tensor, w: Tensor, z: Tensor, needs: list[bool]) -> list[Tensor]:
    return _reference_vjp(_gated_merge_impl, [y, w, z], (), dout, needs)


_gated_merge_bwd_op = torch.library.custom_op(
    "scan_nas::gated_branch_merge_ref_bwd", _gated_merge_bwd_impl, mutates_args=()
)


@_gated_merge_bwd_op.register_fake
def _(dout, y, w, z, needs):
    return _fake_grads([y, w, z], needs, dout)


def _gated_merge_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gated_merge_backward(ctx, dout):
    return tuple(_backward(ctx, _gated_merge_bwd_op, _gated_merge_impl, list(ctx.saved_tensors), (), dout))


_gated_merge_op.register_autograd(_gated_merge_backward, setup_context=_gated_merge_setup_context)


@register_flop_formula(torch.ops.scan_nas.gated_branch_merge_ref)
def _gated_merge_flop_formula(y, w, z, *args, out_shape=None, **kwargs) -> int:
    return counter_flops(gate_flops(y))


def gated_branch_merge_counted(y: Tensor, w: Tensor, z: Tensor) -> Tensor:
    """:func:`kernels.reference.branch_merge_ref` with a gate, as one registered op."""
    return _gated_merge_op(y, w, z)
