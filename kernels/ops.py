"""Public order-dependent ops: input validation and backend dispatch.

``selective_scan`` and ``causal_conv1d`` take the token-major layout documented in :mod:`kernels.reference`.
Backends: ``ref`` (pure PyTorch, the truth), ``triton`` (fused, all K orders in one launch; CUDA, or CPU under
``TRITON_INTERPRET=1``), ``mamba`` (mamba-ssm's CUDA kernel through explicit gathers; the comparison anchor) and
``auto`` (triton on CUDA, ref on CPU). Under a dispatch mode (``FlopCounterMode``, ``FakeTensorMode``; not inside
``torch.func`` transforms or forward-mode AD) the ``ref`` backend's scan, conv and gated merge (and ``mamba``'s scan)
run as the registered ops of :mod:`kernels.ref_ops`, so the counter sees each once, with the Triton op's FLOP rule;
the other reference ops are plain PyTorch, which the counter counts as such, as it counts their Triton ops' rules.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from .ref_ops import causal_conv1d_counted, counted_dispatch, gated_branch_merge_counted, selective_scan_counted
from .reference import (
    branch_attn_merge_ref,
    branch_merge_ref,
    causal_conv1d_ref,
    compute_dtype,
    gather_rows_ref,
    selective_scan_ref,
)

__all__ = [
    "BACKENDS",
    "add_rms_norm",
    "branch_attn_merge",
    "branch_merge",
    "causal_conv1d",
    "gather_rows",
    "resolve_backend",
    "rms_norm",
    "selective_scan",
    "validate_scan_inputs",
]

BACKENDS = ("auto", "ref", "triton", "mamba")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Map ``auto`` to a concrete backend for ``device`` (and the inputs' ``dtype``: fp64 runs on ``ref`` only);
    reject unknown names, and fp64 on the ``triton`` and ``mamba`` kernels."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown scan backend '{backend}'; expected one of {', '.join(BACKENDS)}")
    if dtype == torch.float64:
        if backend in ("triton", "mamba"):
            raise ValueError(
                f"backend '{backend}' takes fp32, fp16 and bf16 inputs, got torch.float64: use backend 'ref' "
                "(what 'auto' picks for fp64)"
            )
        return "ref"
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "triton"
    return "ref"


def _expect_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    ok = t.dim() == len(shape) and all(s is None or s == a for s, a in zip(shape, t.shape))
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")


def _expect_dtype(name: str, t: torch.Tensor, dtypes: tuple) -> None:
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def validate_scan_inputs(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, orders=None, check_orders=False, fp64=False
) -> None:
    """Raise ``ValueError`` naming the expected vs actual shape/dtype/device of the first bad argument. ``fp64``: the
    reference's dtypes too (fp64 inputs, and fp64 A, D, delta_bias)."""
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if delta.dim() != 4:
        raise ValueError(f"delta: expected shape (B, L, K, D), got {tuple(delta.shape)}")
    bsz, seqlen, k, dim = delta.shape
    _expect_shape("u", u, (bsz, seqlen, None, dim))
    if u.shape[2] not in (1, k):
        raise ValueError(f"u: expected shape ({bsz}, {seqlen}, 1 or {k}, {dim}), got {tuple(u.shape)}")
    if A.dim() != 3:
        raise ValueError(f"A: expected shape ({k}, {dim}, N), got {tuple(A.shape)}")
    n = A.shape[2]
    _expect_shape("A", A, (k, dim, n))
    _expect_shape("B", B, (bsz, seqlen, k, n))
    _expect_shape("C", C, (bsz, seqlen, k, n))
    floats, params = (
        (_FLOAT_DTYPES + (torch.float64,), (torch.float32, torch.float64))
        if fp64
        else (_FLOAT_DTYPES, (torch.float32,))
    )
    for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C)):
        _expect_dtype(name, t, floats)
    _expect_dtype("A", A, params)
    optional = {"D": (D, (k, dim)), "delta_bias": (delta_bias, (k, dim))}
    for name, (t, shape) in optional.items():
        if t is not None:
            _expect_shape(name, t, shape)
            _expect_dtype(name, t, params)
    if z is not None:
        _expect_shape("z", z, (bsz, seqlen, None, dim))
        if z.shape[2] not in (1, k):
            raise ValueError(f"z: expected shape ({bsz}, {seqlen}, 1 or {k}, {dim}), got {tuple(z.shape)}")
        _expect_dtype("z", z, floats)
    if seqlen < 1:
        raise ValueError(f"delta: the sequence is empty (L = 0, shape {tuple(delta.shape)}); a scan needs L >= 1")
    _check_orders(orders, k, seqlen, check_orders, u.device)
    _check_tensors(dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias), floating=False)


def _check_tensors(named: dict[str, Any], floating: bool = True) -> None:
    """Each given (non-None) input of ``named`` is a tensor, a floating-point one with ``floating``, all on the device
    of the first: else a one-line ValueError naming it (rather than an error deep in a kernel, or integer zeros)."""
    device = None
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if floating and not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        device = t.device if device is None else device
        if t.device != device:
            first = next(iter(named))
            raise ValueError(f"{name}: expected device {device} (the device of {first}), got {t.device}")


def _host_checkable(t: torch.Tensor) -> bool:
    """Whether a value check of ``t`` waits for nothing: a real CPU tensor, outside torch.compile's tracing, dispatch
    modes (FakeTensorMode, FlopCounterMode) and ``torch.func`` transforms."""
    return (
        t.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._are_functorch_transforms_active()
    )


def _check_orders(orders: torch.Tensor | None, k: int, seqlen: int, check_perm: bool, device: torch.device) -> None:
    """Shape, dtype and device of ``orders``; its indices on the host (a CPU tensor: the kernels would read and write
    outside the tensors with one out of [0, L)); with ``check_perm`` (any device; a GPU waits for it) that each row
    is a permutation."""
    if orders is None:
        return
    if not isinstance(orders, torch.Tensor) or orders.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"orders: expected an int32/int64 tensor of shape ({k}, {seqlen}), got {orders!r:.80}")
    _expect_shape("orders", orders, (k, seqlen))
    if orders.device != device:
        raise ValueError(f"orders: expected device {device} (the device of the inputs), got {orders.device}")
    if orders.numel() and _host_checkable(orders):
        lo, hi = (int(v) for v in orders.aminmax())
        if lo < 0 or hi >= seqlen:
            raise ValueError(
                f"orders: token indices must lie in [0, {seqlen}) (each row a permutation of the L tokens), got "
                f"values from {lo} to {hi}"
            )
    if check_perm:
        want = torch.arange(seqlen, device=orders.device).expand(k, seqlen)
        if not torch.equal(torch.sort(orders.long(), dim=1).values, want):
            bad = [i for i in range(k) if not torch.equal(torch.sort(orders[i].long()).values, want[0])]
            raise ValueError(f"orders: rows {bad} are not permutations of 0..{seqlen - 1}")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    orders: torch.Tensor | None = None,
    backend: str = "auto",
    out_dtype: torch.dtype | None = None,
    check_orders: bool = False,
    recompute_states: bool = False,
) -> torch.Tensor:
    """Mamba-1 selective scan over K token orders, all in one call. See :func:`selective_scan_ref` for semantics.

    Args:
        u: (B, L, Ku, D), Ku in {1, K}. delta: (B, L, K, D). A: (K, D, N) fp32. B, C: (B, L, K, N).
        D: (K, D) fp32 or None. z: (B, L, Kz, D) or None. delta_bias: (K, D) fp32 or None.
        delta_softplus: softplus(delta + delta_bias).
        orders: (K, L) int permutations (None: identity for every order).
        backend: ``auto``, ``ref``, ``triton`` or ``mamba``.
        out_dtype: output dtype (default ``u.dtype``); fp32 output for bf16/fp16 inputs avoids AMP overflow.
        check_orders: verify that each row of ``orders`` is a permutation (costs a sort; on a GPU it waits for the
            device). Without it, orders on the CPU are still checked to lie in [0, L); on a GPU they are not checked
            (the kernels read and write through them: pass permutations, as the models' own orders are).
        recompute_states: ``triton`` backend: keep no chunk-start states for the backward (fp32, B·K·D·N per
            saved-state interval), rerun the forward kernel in the backward instead. Other backends ignore it.

    Returns:
        y: (B, L, K, D) in original token order.
    """
    if not isinstance(recompute_states, bool):
        raise TypeError(f"recompute_states: expected True or False, got {recompute_states!r}")
    device = u.device if isinstance(u, torch.Tensor) else torch.device("cpu")  # (a non-tensor u fails validation)
    backend = resolve_backend(backend, device, compute_dtype(u, delta, A, B, C, D, z, delta_bias))
    validate_scan_inputs(u, delta, A, B, C, D, z, delta_bias, orders, check_orders, fp64=backend == "ref")
    kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, orders=orders, out_dtype=out_dtype)
    if backend == "ref":
        return (selective_scan_counted if counted_dispatch() else selective_scan_ref)(u, delta, A, B, C, **kwargs)
    if backend == "triton":
        from .library import selective_scan_op

        return selective_scan_op(u, delta, A, B, C, **kwargs, recompute_states=recompute_states)
    from .mamba_backend import load_selective_scan_fn, selective_scan_mamba

    if counted_dispatch():  # mamba-ssm's kernel is invisible to dispatch modes: one registered op around it
        load_selective_scan_fn()  # its install hint first, not an error from inside the op
        return selective_scan_counted(u, delta, A, B, C, **kwargs, backend="mamba")
    return selective_scan_mamba(u, delta, A, B, C, **kwargs)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    orders: torch.Tensor | None = None,
    activation: str | None = "silu",
    backend: str = "auto",
    out_dtype: torch.dtype | None = None,
    check_orders: bool = False,
) -> torch.Tensor:
    """Causal depthwise conv1d along each of K token orders. See :func:`causal_conv1d_ref` for semantics.

    Args:
        x: (B, L, Kx, D), Kx in {1, K}. weight: (K, D, W), W >= 1. bias: (K, D) or None. orders: (K, L) or None.
        activation: ``"silu"`` or None. backend: as for :func:`selective_scan`. check_orders: as for
        :func:`selective_scan`.

    Returns:
        (B, L, K, D) in original token order.
    """
    _check_tensors({"x": x, "weight": weight, "bias": bias})
    if weight.dim() != 3 or weight.shape[2] < 1:
        raise ValueError(f"weight: expected shape (K, D, W) with W >= 1, got {tuple(weight.shape)}")
    k, dim, _ = weight.shape
    if x.dim() != 4 or x.shape[3] != dim or x.shape[2] not in (1, k):
        raise ValueError(f"x: expected shape (B, L, 1 or {k}, {dim}), got {tuple(x.shape)}")
    if bias is not None:
        _expect_shape("bias", bias, (k, dim))
    _check_orders(orders, k, x.shape[1], check_orders, x.device)
    if activation not in ("silu", None):
        raise ValueError(f"activation: expected 'silu' or None, got {activation!r}")
    backend = resolve_backend(backend, x.device, compute_dtype(x, weight, bias))
    if backend == "triton":
        from .library import causal_conv1d_op

        return causal_conv1d_op(x, weight, bias, orders=orders, activation=activation, out_dtype=out_dtype)
    # 'mamba' has no conv of its own here: it uses the reference, as before.
    conv = causal_conv1d_counted if counted_dispatch() else causal_conv1d_ref
    return conv(x, weight, bias, orders=orders, activation=activation, out_dtype=out_dtype)


def _check_merge_inputs(y: torch.Tensor, w: torch.Tensor, **more: torch.Tensor | None) -> None:
    """y's and w's shapes; y, w and ``more`` floating tensors on one device."""
    _check_tensors({"y": y, "w": w, **more})
    if y.dim() != 4:
        raise ValueError(f"y: expected shape (B, L, K, D), got {tuple(y.shape)}")
    _expect_shape("w", w, (y.shape[2],))


def branch_merge(
    y: torch.Tensor, w: torch.Tensor, z: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """The mixer's merge of K orders: ``Σ_k w_k · y[:, :, k]``, times ``silu(z)`` with a gate. See
    :func:`branch_merge_ref`.

    Args:
        y: (B, L, K, D). w: (K,) merge weights (fp32; they may require grad). z: optional (B, L, D) gate input (unit
            stride along D is cheapest). backend: as for :func:`selective_scan` (``mamba`` uses the reference).

    Returns:
        (B, L, D) in y's dtype.
    """
    _check_merge_inputs(y, w, z=z)
    if z is not None:
        _expect_shape("z", z, (y.shape[0], y.shape[1], y.shape[3]))
    if resolve_backend(backend, y.device, compute_dtype(y, z)) == "triton":
        from .library import branch_merge_op, gated_branch_merge_op

        return branch_merge_op(y, w) if z is None else gated_branch_merge_op(y, w, z)
    if z is not None and counted_dispatch():
        return gated_branch_merge_counted(y, w, z)
    return branch_merge_ref(y, w, z)


def gather_rows(idx: torch.Tensor, tensors: Sequence[torch.Tensor], backend: str = "auto") -> list[torch.Tensor]:
    """Rows ``idx`` of every tensor along dim 0, ``[t.index_select(0, idx) for t in tensors]``: the sampled orders'
    per-order parameters (and orders) of a supernet layer, in one launch forward and one backward on ``triton``.

    Args:
        idx: (m,) integer indices in [0, K) (on CUDA not checked against K: that would wait for the GPU).
        tensors: one to ``MAX_TENSORS`` (8) tensors of shape (K, ...), on idx's device; integer ones get no gradient.
        backend: as for :func:`selective_scan` (``mamba`` uses the reference).

    Returns:
        One (m, ...) contiguous tensor per input; repeated indices add up in the backward, as for ``index_select``.
    """
    from .triton_gather import MAX_TENSORS

    if isinstance(tensors, torch.Tensor):  # list() would take its rows as the tensors
        raise ValueError("tensors: expected a list of tensors; wrap a single one as [t]")
    tensors = list(tensors)
    if idx.dim() != 1 or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise ValueError(f"idx: expected a 1-D integer tensor, got {idx.dtype} of shape {tuple(idx.shape)}")
    if not 1 <= len(tensors) <= MAX_TENSORS:
        raise ValueError(f"gather_rows: expected 1 to {MAX_TENSORS} tensors, got {len(tensors)}")
    k = tensors[0].shape[0] if tensors[0].dim() else None
    for i, t in enumerate(tensors):
        if t.dim() == 0 or t.shape[0] != k:
            raise ValueError(f"tensors[{i}]: expected shape (K={k}, ...) like tensors[0], got {tuple(t.shape)}")
        if t.device != idx.device:
            raise ValueError(f"tensors[{i}] is on {t.device}, idx on {idx.device}: put them on one device")
    if resolve_backend(backend, idx.device) == "triton":  # any dtype: the gather only moves rows
        host = idx.device.type == "cpu" and not torch.compiler.is_compiling()  # a check here waits for nothing
        if host and idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < k):
            raise IndexError(f"idx: values must lie in [0, {k}), got {idx.tolist()}")
        from .library import gather_rows_op

        return gather_rows_op(idx, tensors)
    return gather_rows_ref(idx, tensors)


def branch_attn_merge(
    y: torch.Tensor,
    w: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    """LocalMamba's per-branch channel gate, then the merge. See :func:`branch_attn_merge_ref`.

    The ``triton`` backend reads y twice forward (pooled LayerNorm statistics, then the gated sum) and writes dy once
    backward; the gate's small MLP runs in fp32.

    Args:
        y: (B, L, K, D). w: (K,). norm_weight, norm_bias: (D,). fc1_weight (H, D), fc1_bias (H,), fc2_weight (D, H),
            fc2_bias (D,). eps: the LayerNorm's. backend: as for :func:`branch_merge`.

    Returns:
        (B, L, D) in y's dtype.
    """
    _check_merge_inputs(y, w, norm_weight=norm_weight, norm_bias=norm_bias, fc1_weight=fc1_weight, fc1_bias=fc1_bias,
                        fc2_weight=fc2_weight, fc2_bias=fc2_bias)  # fmt: skip
    if y.shape[1] < 1:
        raise ValueError(f"y: the sequence is empty (L = 0, shape {tuple(y.shape)}); the gate pools over L >= 1")
    dim = y.shape[3]
    _expect_shape("norm_weight", norm_weight, (dim,))
    _expect_shape("norm_bias", norm_bias, (dim,))
    _expect_shape("fc1_weight", fc1_weight, (None, dim))
    hidden = fc1_weight.shape[0]
    _expect_shape("fc1_bias", fc1_bias, (hidden,))
    _expect_shape("fc2_weight", fc2_weight, (dim, hidden))
    _expect_shape("fc2_bias", fc2_bias, (dim,))
    args = (y, w, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if resolve_backend(backend, y.device, compute_dtype(y)) == "triton":
        from .library import branch_attn_merge_op

        return branch_attn_merge_op(*args, eps=eps)
    return branch_attn_merge_ref(*args, eps=eps)


# Elements of x from which the Triton norms pay for their extra host work in plain eager mode. On an H200 the Triton
# backward cost 147 µs more host time per forward+backward than PyTorch's (scripts/host_overhead.py) and saved 79 µs
# of GPU time on 4.8 M elements (Vim-Ti's (128, 197, 192) norm), about 16 µs per million; the fused add-norm cost
# 383 µs more than the PyTorch ops it replaces (benchmarks/add_norm_h200/host_overhead.json) and saved about 124 µs of
# GPU time per call at Vim-Ti's size in graph mode (vim_tiny 50.9 → 47.8 ms per step, 25 calls), ~26 µs per million.
_NORM_EAGER_MIN_NUMEL = 1 << 23
_ADD_NORM_EAGER_MIN_NUMEL = 1 << 24
# The Triton norms hold 16 whole rows per tile: up to this width (wider rows go to PyTorch, whose kernels suit them;
# past 65,536 channels a tile would exceed Triton's tensor size).
_NORM_MAX_C = 2048


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | None = 1e-5, backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dimension, ``torch.nn.functional.rms_norm(x, (C,), weight, eps)``.

    The Triton path runs PyTorch's forward and a Triton backward that writes dweight as one partial per program instead
    of a column sum over every row (the backward 5.6x faster on Vim-Ti's norm), for an fp32 x (the plain family's fp32
    residual stream). ``backend="triton"`` always takes it; ``auto`` takes it on CUDA when the step is being captured
    in a CUDA graph (no host work per replay) or when x is large enough for the GPU time saved to exceed the extra host
    time of a Triton launch, and leaves the norm to PyTorch (and to Inductor's fusion) under ``torch.compile``. Other
    dtypes and the ``ref``/``mamba`` backends use PyTorch.

    Args:
        x: (..., C). weight: (C,). eps: added to the mean square (None: the machine epsilon of x's dtype, as
            ``torch.nn.functional.rms_norm``). backend: as for :func:`selective_scan`.
    """
    _check_tensors({"x": x, "weight": weight})
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}")
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    use = resolve_backend(backend, x.device) == "triton" and x.dtype == torch.float32 and x.numel() > 0
    if use and x.shape[-1] <= _NORM_MAX_C and _norm_takes_triton(x, backend, _NORM_EAGER_MIN_NUMEL):
        from .library import rms_norm_op

        return rms_norm_op(x, weight, float(eps))
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)


def _norm_takes_triton(x: torch.Tensor, backend: str, eager_min_numel: int) -> bool:
    """``auto``'s rule for the Triton norms on an fp32 stream: under CUDA-graph capture, or from ``eager_min_numel``
    elements in eager mode; never under torch.compile (Inductor fuses PyTorch's norm)."""
    if backend != "auto":
        return True
    return not torch.compiler.is_compiling() and (
        (x.is_cuda and torch.cuda.is_current_stream_capturing()) or x.numel() >= eager_min_numel
    )


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float | None = 1e-5,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm block's residual add and RMSNorm: ``r = residual + x`` and ``y = rms_norm(r)`` (Vim's fused
    add-norm with an fp32 residual).

    Returns ``(y, r)``: y in ``out_dtype`` (default r's dtype; pass the autocast dtype so the next GEMM reads y without
    a cast), r the new residual stream. With ``residual=None`` (the first block) ``r`` is x. The Triton path (fp32
    residual) does each direction in one pass: the forward writes r and y, the backward adds the residual's gradient to
    the norm's and writes it for both inputs. ``auto`` takes it under CUDA-graph capture and in eager mode from
    ``_ADD_NORM_EAGER_MIN_NUMEL`` elements (its extra host time is larger than the plain norm's); otherwise, and under
    torch.compile, the same thing is composed from PyTorch ops.

    Args:
        x: (..., C), the block input (the previous mixer's output). residual: like x, or None. weight: (C,).
        eps: added to the mean square (None: the machine epsilon of r's dtype, as ``torch.nn.functional.rms_norm``).
        out_dtype: dtype of y. backend: as for :func:`selective_scan`.
    """
    _check_tensors({"x": x, "residual": residual, "weight": weight})
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"add_rms_norm: weight {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}"
        )
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} and x {tuple(x.shape)} differ in shape")
    res_dtype = x.dtype if residual is None else torch.promote_types(residual.dtype, x.dtype)
    out_dtype = res_dtype if out_dtype is None else out_dtype
    eps = torch.finfo(res_dtype).eps if eps is None else eps
    use = (
        resolve_backend(backend, x.device) == "triton"
        and res_dtype == torch.float32
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and x.numel() > 0
        and x.shape[-1] <= _NORM_MAX_C
        and _norm_takes_triton(x, backend, _ADD_NORM_EAGER_MIN_NUMEL)
    )
    if use:
        from .library import add_rms_norm_op

        return add_rms_norm_op(x, residual, weight, float(eps), out_dtype)
    r = x if residual is None else residual + x
    return torch.nn.functional.rms_norm(r, (r.shape[-1],), weight, eps).to(out_dtype), r


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """LayerNorm over the last dimension, ``torch.nn.functional.layer_norm(x, (C,), weight, bias, eps)``, in out_dtype.

    The Triton path (fp32, bf16 or fp16 x) computes in fp32 and writes out_dtype directly: fp32 as autocast's
    LayerNorm returns it, or the dtype the next GEMM reads, which saves that GEMM's cast. Its forward takes 16 rows
    per tile where PyTorch's kernel takes a thread block per row (a fifth of the memory rate at VMamba-T's 96-768
    channels on an H200); its backward writes one partial of dweight and dbias per program. ``auto`` takes it on CUDA
    under CUDA-graph capture or from ``_NORM_EAGER_MIN_NUMEL`` elements in eager mode, and leaves the norm to PyTorch
    (and Inductor) under ``torch.compile``; other dtypes, rows wider than ``_NORM_MAX_C`` and other backends use
    PyTorch.

    Args:
        x: (..., C). weight, bias: (C,) or None. eps: added to the variance. out_dtype: dtype of the result (default
            x's; under autocast PyTorch's LayerNorm returns fp32). backend: as for :func:`selective_scan`.
    """
    _check_tensors({"x": x, "weight": weight, "bias": bias})
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.shape[0] != x.shape[-1]):
            raise ValueError(f"layer_norm: {name} {tuple(t.shape)} does not match the last dim of x {tuple(x.shape)}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    use = (
        resolve_backend(backend, x.device) == "triton"
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and out_dtype in (torch.float32, torch.bfloat16, torch.float16)
        and x.numel() > 0
        and x.shape[-1] <= _NORM_MAX_C
        and _norm_takes_triton(x, backend, _NORM_EAGER_MIN_NUMEL)
    )
    if use:
        from .library import layer_norm_op

        return layer_norm_op(x, weight, bias, float(eps), out_dtype)
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps).to(out_dtype)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
