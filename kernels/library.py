"""torch.library registration of the Triton ops, so torch.compile keeps each one as a single graph node and
``torch.utils.flop_counter.FlopCounterMode`` counts them.

Registered ops (namespace ``scan_nas``):
    selective_scan_fwd(u, delta, A, B, C, D?, z?, delta_bias?, orders?, delta_softplus, out_dtype?, save_states,
                       store_y=True) -> (y, chunk_states); y is empty with store_y=False (the backward's recompute)
    selective_scan_bwd(dy, u, delta, A, B, C, D?, z?, delta_bias?, orders?, chunk_states, delta_softplus)
        -> [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias] (empty tensors for absent inputs)
    causal_conv1d_fwd / causal_conv1d_bwd: the same for the per-order causal conv1d.
    branch_merge / branch_merge_bwd: the mixer's weighted sum over K orders.
    gated_branch_merge(y, w, z, keep_pre) -> (out, pre) / gated_branch_merge_bwd: the same times silu(z) (Vim's gate,
        applied once after the merge); pre, the sum before the gate, is kept for dz (empty without keep_pre).
    branch_attn_merge / branch_attn_merge_bwd: the same behind LocalMamba's per-branch channel gate.
    gather_rows(idx, tensors[]) -> tensors[] / gather_rows_bwd: rows of several (K, ...) tensors at the same indices
        (the sampled orders' parameters), one launch each way.
    rms_norm(x, weight, eps) / rms_norm_bwd: the plain family's RMSNorm (PyTorch's forward, the Triton backward).
    add_rms_norm(x, residual?, weight, eps, out_dtype) -> (y, r) / add_rms_norm_bwd: the residual add fused with it.
    layer_norm(x, weight?, bias?, eps, out_dtype) / layer_norm_bwd: LayerNorm in fp32, written in out_dtype.

FLOPs (:mod:`kernels.flop_rules`) follow VMamba's rule for the scan: 9·B·L·K·D·N, plus B·L·K·D for the D skip and
B·L·K·D for the z gate; a gate applied once after the merge (``gated_branch_merge``) counts the same B·L·K·D, so a
model's count does not depend on where its gate runs; the conv counts B·L·K·D·W and LocalMamba's channel gate its two
linear layers. Each op reports twice its rule, ``FlopCounterMode``'s two per multiply-add, as it counts matmuls.
The ``ref`` backend's registered form, used under dispatch modes, is :mod:`kernels.ref_ops`; ``mamba`` is not
registered.
"""

import torch
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import register_flop_formula

from ._host import cdiv
from .flop_rules import attn_merge_flops, conv_flops, counter_flops, gate_flops, scan_flops
from .triton_conv import conv_bwd, conv_fwd
from .triton_gather import gather_rows_bwd, gather_rows_fwd
from .triton_merge import (
    branch_attn_merge_bwd,
    branch_attn_merge_fwd,
    branch_merge_bwd,
    branch_merge_fwd,
    gated_merge_bwd,
    gated_merge_fwd,
)
from .triton_norm import add_rms_norm_bwd, add_rms_norm_fwd, layer_norm_bwd, layer_norm_fwd, rms_norm_bwd
from .triton_scan import scan_bwd, scan_config, scan_fwd

__all__ = [
    "add_rms_norm_op",
    "branch_attn_merge_op",
    "branch_merge_op",
    "gated_branch_merge_op",
    "gather_rows_op",
    "causal_conv1d_op",
    "layer_norm_op",
    "direct_eager",
    "rms_norm_op",
    "scan_flops",
    "selective_scan_op",
]

Tensor = torch.Tensor


def direct_eager() -> bool:
    """Whether a call may skip the dispatcher: plain eager execution, no torch.compile tracing, no dispatch mode.

    Every op below is registered with torch.library, so torch.compile keeps it as one graph node and
    ``FlopCounterMode`` (a dispatch mode) sees it. In plain eager mode the same implementations run inside a
    ``torch.autograd.Function`` instead: the registered path's Python dispatch and ``register_autograd`` wrapper cost
    several hundred microseconds per forward+backward, and eager training of these models is bound by such host time.
    """
    return not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0


def _eager_function(name: str, impl, setup_context, backward, n_differentiable: int = 1) -> type:
    """An autograd.Function running ``impl`` directly, with the registered op's setup_context and backward; outputs
    after the first ``n_differentiable`` carry no gradient."""

    def forward(ctx, *args):
        out = impl(*args)
        ctx.direct = True  # the backward calls the implementations directly too
        setup_context(ctx, args, out)
        if isinstance(out, tuple) and len(out) > n_differentiable:
            ctx.mark_non_differentiable(*out[n_differentiable:])
        return out

    # once_differentiable: the backward is not itself differentiable (the registered ops have no formula for it
    # either), so a double backward raises instead of returning a gradient of a partial graph.
    attrs = {"forward": staticmethod(forward), "backward": staticmethod(once_differentiable(backward))}
    return type(name, (torch.autograd.Function,), attrs)


def _scan_fwd_impl(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    orders: Tensor | None,
    delta_softplus: bool,
    out_dtype: torch.dtype | None,
    save_states: bool,
    store_y: bool = True,
) -> tuple[Tensor, Tensor]:
    return scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, orders, out_dtype, save_states, store_y=store_y
    )


_scan_fwd_op = torch.library.custom_op("scan_nas::selective_scan_fwd", _scan_fwd_impl, mutates_args=())


@_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, orders, delta_softplus, out_dtype, save_states, store_y=True):
    bsz, seqlen, k, dim = delta.shape
    n = A.shape[2]
    y = delta.new_empty((bsz, seqlen, k, dim) if store_y else (0,), dtype=out_dtype or u.dtype)
    if not save_states:
        return y, delta.new_empty((0,), dtype=torch.float32)
    bt = scan_config(dim, n, seqlen, u.device)[0]
    return y, delta.new_empty((bsz * k, cdiv(seqlen, bt), dim, n), dtype=torch.float32)


def _scan_bwd_impl(
    dy: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    orders: Tensor | None,
    states: Tensor,
    delta_softplus: bool,
) -> list[Tensor]:
    grads = scan_bwd(dy, u, delta, A, B, C, D, z, delta_bias, delta_softplus, orders, states)
    return [g if g is not None else u.new_empty((0,)) for g in grads]


_scan_bwd_op = torch.library.custom_op("scan_nas::selective_scan_bwd", _scan_bwd_impl, mutates_args=())


@_scan_bwd_op.register_fake
def _(dy, u, delta, A, B, C, D, z, delta_bias, orders, states, delta_softplus):
    # The kernels write every gradient into a fresh contiguous tensor: not empty_like, which keeps an input's strides
    # (delta and z are often slices of a wider projection output) and would tell the compiler the wrong layout.
    # dA, dD and d(delta_bias) are fp32 sums whatever their inputs' dtype (ops.selective_scan requires fp32 anyway).
    like = (u, delta, A, B, C, D, z, delta_bias)
    fp32 = (False, False, True, False, False, True, False, True)
    return [
        (t.new_empty(t.shape, dtype=torch.float32) if f else t.new_empty(t.shape)) if t is not None else u.new_empty(0)
        for t, f in zip(like, fp32)
    ]


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, orders, delta_softplus, _out_dtype, save, _store_y = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, orders, output[1])
    ctx.delta_softplus = delta_softplus
    ctx.recompute = not save  # a forward that kept no states (recompute_states): the backward reruns it first
    # The states output never receives a gradient: without this, autograd fills a zero tensor the size of the
    # states for it on every backward (154 MB and 0.03 ms on VMamba-T stage 1).
    ctx.set_materialize_grads(False)


def _scan_backward(ctx, dy, _dstates):
    u, delta, A, B, C, D, z, delta_bias, orders, states = ctx.saved_tensors
    if dy is None:  # no gradient reached y (grads are not materialized)
        return (None,) * 13  # one per op input
    fwd, bwd = (_scan_fwd_impl, _scan_bwd_impl) if getattr(ctx, "direct", False) else (_scan_fwd_op, _scan_bwd_op)
    if ctx.recompute:
        # States only: the rerun neither computes nor writes y.
        _, states = fwd(u, delta, A, B, C, D, z, delta_bias, orders, ctx.delta_softplus, None, True, False)
    grads = bwd(dy.contiguous(), u, delta, A, B, C, D, z, delta_bias, orders, states, ctx.delta_softplus)
    present = (u, delta, A, B, C, D, z, delta_bias)
    grads = [g if t is not None else None for g, t in zip(grads, present)]
    return (*grads, None, None, None, None, None)


_scan_fwd_op.register_autograd(_scan_backward, setup_context=_scan_setup_context)
_ScanFunction = _eager_function("_ScanFunction", _scan_fwd_impl, _scan_setup_context, _scan_backward)


@register_flop_formula(torch.ops.scan_nas.selective_scan_fwd)
def _scan_flop_formula(u, delta, A, B, C, D, z, delta_bias, *args, out_shape=None, **kwargs) -> int:
    return counter_flops(scan_flops(delta, A, D is not None, z is not None))


def selective_scan_op(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, orders=None,
                      out_dtype=None, recompute_states=False) -> Tensor:  # fmt: skip
    """The registered Triton scan; same arguments as :func:`kernels.triton_scan.selective_scan_triton`.

    ``recompute_states``: keep no chunk-start states between forward and backward (the backward reruns the forward
    kernel for the states alone, without computing or writing y): less memory for one more pass over the inputs.
    """
    save = (
        torch.is_grad_enabled()
        and not recompute_states
        and any(t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias))
    )
    fwd = _ScanFunction.apply if direct_eager() else _scan_fwd_op
    y, _ = fwd(u, delta, A, B, C, D, z, delta_bias, orders, bool(delta_softplus), out_dtype, save, True)
    return y


def _conv_fwd_impl(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    orders: Tensor | None,
    silu: bool,
    out_dtype: torch.dtype | None,
) -> Tensor:
    return conv_fwd(x, weight, bias, orders, "silu" if silu else None, out_dtype)


_conv_fwd_op = torch.library.custom_op("scan_nas::causal_conv1d_fwd", _conv_fwd_impl, mutates_args=())


@_conv_fwd_op.register_fake
def conv_fwd_fake(x, weight, bias, orders, silu, out_dtype):
    """The conv's output as a shape (the fake implementation of this op and of ``kernels.ref_ops``'s)."""
    return x.new_empty((x.shape[0], x.shape[1], weight.shape[0], x.shape[3]), dtype=out_dtype or x.dtype)


def _conv_bwd_impl(
    dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, orders: Tensor | None, silu: bool
) -> list[Tensor]:
    dx, dw, db = conv_bwd(dout, x, weight, bias, orders, "silu" if silu else None)
    return [dx, dw, db if db is not None else x.new_empty((0,))]


_conv_bwd_op = torch.library.custom_op("scan_nas::causal_conv1d_bwd", _conv_bwd_impl, mutates_args=())


@_conv_bwd_op.register_fake
def _(dout, x, weight, bias, orders, silu):
    return [x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape) if bias is not None
            else x.new_empty(0)]  # fmt: skip


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, orders, silu, _ = inputs
    ctx.save_for_backward(x, weight, bias, orders)
    ctx.silu = silu


def _conv_backward(ctx, dout):
    x, weight, bias, orders = ctx.saved_tensors
    bwd = _conv_bwd_impl if getattr(ctx, "direct", False) else _conv_bwd_op
    dx, dw, db = bwd(dout.contiguous(), x, weight, bias, orders, ctx.silu)
    return dx, dw, db if bias is not None else None, None, None, None


_conv_fwd_op.register_autograd(_conv_backward, setup_context=_conv_setup_context)


@register_flop_formula(torch.ops.scan_nas.causal_conv1d_fwd)
def _conv_flop_formula(x, weight, *args, out_shape=None, **kwargs) -> int:
    return counter_flops(conv_flops(x, weight))


_ConvFunction = _eager_function("_ConvFunction", _conv_fwd_impl, _conv_setup_context, _conv_backward)


def causal_conv1d_op(x, weight, bias=None, orders=None, activation="silu", out_dtype=None) -> Tensor:
    """The registered Triton causal conv1d; same arguments as :func:`kernels.triton_conv.causal_conv1d_triton`."""
    fwd = _ConvFunction.apply if direct_eager() else _conv_fwd_op
    return fwd(x, weight, bias, orders, activation == "silu", out_dtype)


def _merge_impl(y: Tensor, w: Tensor) -> Tensor:
    return branch_merge_fwd(y, w)


_merge_op = torch.library.custom_op("scan_nas::branch_merge", _merge_impl, mutates_args=())


@_merge_op.register_fake
def _(y, w):
    return y.new_empty((y.shape[0], y.shape[1], y.shape[3]))


def _merge_bwd_impl(dout: Tensor, y: Tensor, w: Tensor, need_dw: bool) -> list[Tensor]:
    dy, dw = branch_merge_bwd(dout, y, w, need_dw)
    return [dy, dw if dw is not None else w.new_empty((0,), dtype=torch.float32)]


_merge_bwd_op = torch.library.custom_op("scan_nas::branch_merge_bwd", _merge_bwd_impl, mutates_args=())


@_merge_bwd_op.register_fake
def _(dout, y, w, need_dw):
    return [y.new_empty(y.shape), w.new_empty(w.shape if need_dw else (0,), dtype=torch.float32)]


def _merge_setup_context(ctx, inputs, output):
    y, w = inputs
    # y is needed only for the weights' gradient; fixed weights (every non-search model) keep no (B, L, K, D) tensor.
    ctx.save_for_backward(y if w.requires_grad else None, w)
    ctx.y_shape, ctx.y_dtype = y.shape, y.dtype


def _y_or_stand_in(ctx, y: Tensor | None, dout: Tensor) -> Tensor:
    """The saved y, or (fixed weights: not saved) a stride-0 stand-in carrying only y's shape and dtype."""
    return y if y is not None else dout.new_empty((), dtype=ctx.y_dtype).expand(ctx.y_shape)


def _merge_backward(ctx, dout):
    y, w = ctx.saved_tensors
    need_dw = y is not None and ctx.needs_input_grad[1]
    y = _y_or_stand_in(ctx, y, dout)
    bwd = _merge_bwd_impl if getattr(ctx, "direct", False) else _merge_bwd_op
    dy, dw = bwd(dout, y, w, need_dw)
    return dy, dw.to(w.dtype) if need_dw else None


_merge_op.register_autograd(_merge_backward, setup_context=_merge_setup_context)
_MergeFunction = _eager_function("_MergeFunction", _merge_impl, _merge_setup_context, _merge_backward)


def branch_merge_op(y: Tensor, w: Tensor) -> Tensor:
    """The registered Triton merge: ``Σ_k w_k · y[:, :, k]`` → (B, L, D) in y's dtype."""
    return (_MergeFunction.apply if direct_eager() else _merge_op)(y, w)


def _gated_merge_impl(y: Tensor, w: Tensor, z: Tensor, keep_pre: bool) -> tuple[Tensor, Tensor]:
    return gated_merge_fwd(y, w, z, keep_pre)


_gated_merge_op = torch.library.custom_op("scan_nas::gated_branch_merge", _gated_merge_impl, mutates_args=())


@_gated_merge_op.register_fake
def _(y, w, z, keep_pre):
    out = y.new_empty((y.shape[0], y.shape[1], y.shape[3]))
    return out, out.new_empty(out.shape if keep_pre else (0,), dtype=torch.promote_types(y.dtype, z.dtype))


def _gated_merge_bwd_impl(
    dout: Tensor, y: Tensor, w: Tensor, z: Tensor, pre: Tensor, need_dw: bool
) -> tuple[Tensor, Tensor, Tensor]:
    dy, dz, dw = gated_merge_bwd(dout, y, w, z, pre, need_dw)
    return dy, dz, dw if dw is not None else w.new_empty((0,), dtype=torch.float32)


_gated_merge_bwd_op = torch.library.custom_op(
    "scan_nas::gated_branch_merge_bwd", _gated_merge_bwd_impl, mutates_args=()
)


@_gated_merge_bwd_op.register_fake
def _(dout, y, w, z, pre, need_dw):
    dz = z.new_empty((z.shape[0], z.shape[1], z.shape[2]))
    return y.new_empty(y.shape), dz, w.new_empty(w.shape if need_dw else (0,), dtype=torch.float32)


def _gated_merge_setup_context(ctx, inputs, output):
    y, w, z, _keep_pre = inputs
    # The merge before the gate is kept for dz; y only for the weights' gradient.
    ctx.save_for_backward(y if w.requires_grad else None, w, z, output[1])
    ctx.y_shape, ctx.y_dtype = y.shape, y.dtype
    ctx.set_materialize_grads(False)  # pre never receives a gradient: no zero (B, L, D) tensor for it


def _gated_merge_backward(ctx, dout, _dpre):
    y, w, z, pre = ctx.saved_tensors
    if dout is None:
        return None, None, None, None
    if pre.numel() == 0 and dout.numel():
        raise RuntimeError("gated_branch_merge: the forward kept no pre-gate sum (keep_pre=False): no backward")
    need_dw = y is not None and ctx.needs_input_grad[1]
    y = _y_or_stand_in(ctx, y, dout)
    bwd = _gated_merge_bwd_impl if getattr(ctx, "direct", False) else _gated_merge_bwd_op
    dy, dz, dw = bwd(dout, y, w, z, pre, need_dw)
    return dy, dw.to(w.dtype) if need_dw else None, dz, None


_gated_merge_op.register_autograd(_gated_merge_backward, setup_context=_gated_merge_setup_context)


@register_flop_formula(torch.ops.scan_nas.gated_branch_merge)
def _gated_merge_flop_formula(y, w, z, *args, out_shape=None, **kwargs) -> int:
    return counter_flops(gate_flops(y))


_GatedMergeFunction = _eager_function(
    "_GatedMergeFunction", _gated_merge_impl, _gated_merge_setup_context, _gated_merge_backward
)


def gated_branch_merge_op(y: Tensor, w: Tensor, z: Tensor) -> Tensor:
    """The registered Triton gated merge: ``silu(z) ⊙ Σ_k w_k · y[:, :, k]`` → (B, L, D) in y's dtype. The sum before
    the gate, which the backward needs, is written only when a backward can follow (grad mode on and an input that
    requires grad): inference writes one (B, L, D) tensor per layer less."""
    keep_pre = torch.is_grad_enabled() and (y.requires_grad or w.requires_grad or z.requires_grad)
    return (_GatedMergeFunction.apply if direct_eager() else _gated_merge_op)(y, w, z, keep_pre)[0]


def _attn_merge_impl(
    y: Tensor, w: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float, fc1_weight: Tensor, fc1_bias: Tensor,
    fc2_weight: Tensor, fc2_bias: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    return branch_attn_merge_fwd(y, w, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias)


_attn_merge_op = torch.library.custom_op("scan_nas::branch_attn_merge", _attn_merge_impl, mutates_args=())


@_attn_merge_op.register_fake
def _(y, w, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    bsz, seqlen, k, dim = y.shape
    stats = y.new_empty((bsz, seqlen, k), dtype=torch.float32)
    per_branch = y.new_empty((bsz, k, dim), dtype=torch.float32)
    hidden = y.new_empty((bsz, k, fc1_weight.shape[0]), dtype=torch.float32)
    return (
        y.new_empty((bsz, seqlen, dim)),
        per_branch,
        stats,
        torch.empty_like(stats),
        hidden,
        torch.empty_like(per_branch),
    )


def _attn_merge_bwd_impl(
    dout: Tensor, y: Tensor, w: Tensor, pooled: Tensor, mean: Tensor, rstd: Tensor, h1: Tensor, g: Tensor,
    norm_weight: Tensor, norm_bias: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor,
) -> list[Tensor]:  # fmt: skip
    return list(branch_attn_merge_bwd(dout, y, w, pooled, mean, rstd, h1, g, norm_weight, norm_bias, fc1_weight,
                                      fc1_bias, fc2_weight, fc2_bias))  # fmt: skip


_attn_merge_bwd_op = torch.library.custom_op("scan_nas::branch_attn_merge_bwd", _attn_merge_bwd_impl, mutates_args=())


@_attn_merge_bwd_op.register_fake
def _(dout, y, w, pooled, mean, rstd, h1, g, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    params = (w, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    return [y.new_empty(y.shape)] + [p.new_empty(p.shape, dtype=torch.float32) for p in params]


def _attn_merge_setup_context(ctx, inputs, output):
    y, w, norm_weight, norm_bias, _eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias = inputs
    ctx.save_for_backward(y, w, *output[1:], norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    ctx.set_materialize_grads(False)  # the saved intermediates never receive a gradient


def _attn_merge_backward(ctx, dout, *_unused):
    y, w, pooled, mean, rstd, h1, g, *params = ctx.saved_tensors
    if dout is None:
        return (None,) * 9
    bwd = _attn_merge_bwd_impl if getattr(ctx, "direct", False) else _attn_merge_bwd_op
    dy, dw, *dparams = bwd(dout, y, w, pooled, mean, rstd, h1, g, *params)
    dparams = [d.to(p.dtype) for d, p in zip(dparams, params)]  # fp32 sums; a no-op for fp32 parameters
    return dy, dw.to(w.dtype), dparams[0], dparams[1], None, *dparams[2:]


_attn_merge_op.register_autograd(_attn_merge_backward, setup_context=_attn_merge_setup_context)


@register_flop_formula(torch.ops.scan_nas.branch_attn_merge)
def _attn_merge_flop_formula(y, w, norm_weight, norm_bias, eps, fc1_weight, *args, out_shape=None, **kwargs) -> int:
    return counter_flops(attn_merge_flops(y, fc1_weight))


_AttnMergeFunction = _eager_function(
    "_AttnMergeFunction", _attn_merge_impl, _attn_merge_setup_context, _attn_merge_backward
)


def branch_attn_merge_op(y, w, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps=1e-5) -> Tensor:
    """The registered Triton gated merge; same arguments as :func:`kernels.reference.branch_attn_merge_ref`."""
    fwd = _AttnMergeFunction.apply if direct_eager() else _attn_merge_op
    return fwd(y, w, norm_weight, norm_bias, float(eps), fc1_weight, fc1_bias, fc2_weight, fc2_bias)[0]


def _gather_impl(idx: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    return gather_rows_fwd(idx.contiguous(), [t.contiguous() for t in tensors])


_gather_op = torch.library.custom_op("scan_nas::gather_rows", _gather_impl, mutates_args=())


@_gather_op.register_fake
def _(idx, tensors):
    return [t.new_empty((idx.shape[0], *t.shape[1:])) for t in tensors]


def _gather_bwd_impl(idx: Tensor, grads: list[Tensor], k: int) -> list[Tensor]:
    return gather_rows_bwd(idx.contiguous(), [g.contiguous() for g in grads], k)


_gather_bwd_op = torch.library.custom_op("scan_nas::gather_rows_bwd", _gather_bwd_impl, mutates_args=())


@_gather_bwd_op.register_fake
def _(idx, grads, k):
    return [g.new_empty((k, *g.shape[1:])) for g in grads]


def _gather_setup_context(ctx, inputs, output):
    idx, tensors = inputs
    ctx.save_for_backward(idx)
    ctx.k = tensors[0].shape[0]
    # Rows of a tensor that needs no gradient (an integer one, a frozen parameter) carry none, as index_select's.
    ctx.learns = [t.is_floating_point() and t.requires_grad for t in tensors]
    frozen = [o for o, learns in zip(output, ctx.learns) if not learns and o.is_floating_point()]
    if frozen:
        ctx.mark_non_differentiable(*frozen)
    ctx.set_materialize_grads(False)  # an output nobody used gets no (K, ...) gradient


def _gather_backward(ctx, grads):
    (idx,) = ctx.saved_tensors
    take = [i for i, g in enumerate(grads) if g is not None and ctx.learns[i]]
    out = [None] * len(grads)
    if take:
        bwd = _gather_bwd_impl if getattr(ctx, "direct", False) else _gather_bwd_op
        for i, g in zip(take, bwd(idx, [grads[i] for i in take], ctx.k)):
            out[i] = g
    return None, out


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup_context)


class _GatherFunction(torch.autograd.Function):
    """The eager direct path of ``gather_rows``: tensors as separate arguments, outputs as a tuple."""

    @staticmethod
    def forward(ctx, idx, *tensors):
        out = _gather_impl(idx, list(tensors))
        ctx.direct = True
        _gather_setup_context(ctx, (idx, tensors), out)
        return tuple(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        return None, *_gather_backward(ctx, grads)[1]


def gather_rows_op(idx: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    """The registered Triton gather: ``[t.index_select(0, idx) for t in tensors]``, each output contiguous."""
    if direct_eager():
        return list(_GatherFunction.apply(idx, *tensors))
    return _gather_op(idx, tensors)


def _norm_fwd_impl(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)


_norm_fwd_op = torch.library.custom_op("scan_nas::rms_norm", _norm_fwd_impl, mutates_args=())


@_norm_fwd_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


def _norm_bwd_impl(dout: Tensor, x: Tensor, weight: Tensor, eps: float) -> list[Tensor]:
    return list(rms_norm_bwd(dout, x, weight, eps))


_norm_bwd_op = torch.library.custom_op("scan_nas::rms_norm_bwd", _norm_bwd_impl, mutates_args=())


@_norm_bwd_op.register_fake
def _(dout, x, weight, eps):
    return [x.new_empty(x.shape), weight.new_empty(weight.shape)]


def _norm_setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _norm_backward(ctx, dout):
    x, weight = ctx.saved_tensors
    bwd = _norm_bwd_impl if getattr(ctx, "direct", False) else _norm_bwd_op
    dx, dw = bwd(dout.contiguous(), x, weight, ctx.eps)
    return dx, dw, None


_norm_fwd_op.register_autograd(_norm_backward, setup_context=_norm_setup_context)
_NormFunction = _eager_function("_NormFunction", _norm_fwd_impl, _norm_setup_context, _norm_backward)


def rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dimension: PyTorch's fused forward, the Triton backward. x (..., C), weight (C,)."""
    return (_NormFunction.apply if direct_eager() else _norm_fwd_op)(x, weight, eps)


def _add_norm_fwd_impl(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    return add_rms_norm_fwd(x, residual, weight, eps, out_dtype)


_add_norm_fwd_op = torch.library.custom_op("scan_nas::add_rms_norm", _add_norm_fwd_impl, mutates_args=())


@_add_norm_fwd_op.register_fake
def _(x, residual, weight, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape, dtype=torch.float32)


def _add_norm_bwd_impl(
    dy: Tensor, dr: Tensor | None, r: Tensor, weight: Tensor, eps: float, x_dtype: torch.dtype, has_residual: bool
) -> list[Tensor]:
    dx, dres, dw = add_rms_norm_bwd(dy, dr, r, weight, eps, x_dtype, has_residual)
    return [dx, dres if dres is not None else r.new_empty(0), dw]


_add_norm_bwd_op = torch.library.custom_op("scan_nas::add_rms_norm_bwd", _add_norm_bwd_impl, mutates_args=())


@_add_norm_bwd_op.register_fake
def _(dy, dr, r, weight, eps, x_dtype, has_residual):
    dres = r.new_empty(r.shape) if has_residual else r.new_empty(0)
    return [r.new_empty(r.shape, dtype=x_dtype), dres, weight.new_empty(weight.shape)]


def _add_norm_setup_context(ctx, inputs, output):
    x, residual, weight, eps, _ = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.eps, ctx.x_dtype, ctx.has_residual = eps, x.dtype, residual is not None
    ctx.set_materialize_grads(False)  # r's gradient is None where r is not used again (the final norm)


def _add_norm_backward(ctx, dy, dr):
    r, weight = ctx.saved_tensors
    bwd = _add_norm_bwd_impl if getattr(ctx, "direct", False) else _add_norm_bwd_op
    if dy is None:
        dy = torch.zeros_like(r)
    dx, dres, dw = bwd(dy.contiguous(), None if dr is None else dr.contiguous(), r, weight, ctx.eps, ctx.x_dtype,
                       ctx.has_residual)  # fmt: skip
    return dx, (dres if ctx.has_residual else None), dw, None, None


_add_norm_fwd_op.register_autograd(_add_norm_backward, setup_context=_add_norm_setup_context)
_AddNormFunction = _eager_function(
    "_AddNormFunction", _add_norm_fwd_impl, _add_norm_setup_context, _add_norm_backward, n_differentiable=2
)


def add_rms_norm_op(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, out_dtype: torch.dtype):
    """``r = residual + x`` (fp32) and ``y = rms_norm(r)`` in out_dtype, in one Triton pass each way: (y, r)."""
    return (_AddNormFunction.apply if direct_eager() else _add_norm_fwd_op)(x, residual, weight, eps, out_dtype)


def _ln_fwd_impl(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out_dtype: torch.dtype) -> Tensor:
    return layer_norm_fwd(x, weight, bias, eps, out_dtype)


_ln_fwd_op = torch.library.custom_op("scan_nas::layer_norm", _ln_fwd_impl, mutates_args=())


@_ln_fwd_op.register_fake
def _(x, weight, bias, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


def _ln_bwd_impl(dout: Tensor, x: Tensor, weight: Tensor | None, eps: float, need_wb: bool) -> list[Tensor]:
    dx, dw, db = layer_norm_bwd(dout, x, weight, eps, need_wb)
    if dw is None:
        dw, db = x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    return [dx, dw, db]


_ln_bwd_op = torch.library.custom_op("scan_nas::layer_norm_bwd", _ln_bwd_impl, mutates_args=())


@_ln_bwd_op.register_fake
def _(dout, x, weight, eps, need_wb):
    c = x.shape[-1] if need_wb else 0
    return [x.new_empty(x.shape), x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.float32)]


def _ln_setup_context(ctx, inputs, output):
    x, weight, bias, eps, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps
    ctx.affine = (weight is not None, bias is not None)
    ctx.wb_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _ln_backward(ctx, dout):
    x, weight = ctx.saved_tensors
    bwd = _ln_bwd_impl if getattr(ctx, "direct", False) else _ln_bwd_op
    need_wb = bool(ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
    dx, dw, db = bwd(dout.contiguous(), x, weight, ctx.eps, need_wb)
    dw = dw.to(ctx.wb_dtypes[0]) if need_wb and ctx.affine[0] else None
    db = db.to(ctx.wb_dtypes[1]) if need_wb and ctx.affine[1] else None
    return dx, dw, db, None, None


_ln_fwd_op.register_autograd(_ln_backward, setup_context=_ln_setup_context)
_LayerNormFunction = _eager_function("_LayerNormFunction", _ln_fwd_impl, _ln_setup_context, _ln_backward)


def layer_norm_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out_dtype: torch.dtype) -> Tensor:
    """LayerNorm over the last dimension in Triton, forward and backward, computed in fp32 and written in out_dtype.
    x (..., C), weight and bias (C,) or None."""
    return (_LayerNormFunction.apply if direct_eager() else _ln_fwd_op)(x, weight, bias, eps, out_dtype)
