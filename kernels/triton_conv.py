"""Per-order causal depthwise conv1d in Triton (Vim/LocalVim's mixer conv), forward and backward.

Layout: x (B, L, Kx, D) with Kx in {1, K}, weight (K, D, W), bias (K, D), orders (K, L); out (B, L, K, D) in
original token order. Step t of order k sees the tokens that order visits at steps t-W+1..t. Each program owns a
block of steps of one (batch, order) and a block of channels; the W taps are gathered through ``orders[k]`` with
pointer loads and the result is written straight to the token's original position.

Backward: one kernel recomputes the pre-activation and writes its gradient in scan-step order (so the second pass
reads it without a gather). Each of its programs walks SPAN step blocks and keeps dweight and dbias as elementwise
sums, reduced over steps once at its end (one partial per program, not per block). A second kernel owns blocks of
original token positions, finds each order's step for them through the inverse orders and gathers the W taps of
that gradient, summing the K orders in registers when they share one x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_pow2
from .triton_scan import _token_index, sm_count

__all__ = ["causal_conv1d_triton"]


@triton.jit
def _tap(x_base, orders_ptr, k, L, t, mask_t, offs_d, mask_d, s_xl, lag: tl.constexpr, HAS_ORDERS: tl.constexpr):
    """x at the steps ``lag`` before ``t`` of order k, as fp32 (zero before the first step and past L)."""
    s = t - lag
    valid = mask_t & (s >= 0)
    idx = _token_index(orders_ptr, k, L, s, valid, HAS_ORDERS)
    m = valid[:, None] & mask_d[None, :]
    return tl.load(x_base + idx[:, None] * s_xl + offs_d[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, orders_ptr, out_ptr,
    L, K, DIM,
    s_xb, s_xl, s_xk,
    W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_ORDERS: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_bk = tl.program_id(2)
    b = (pid_bk // K).to(tl.int64)
    k = pid_bk % K
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = t < L
    mask_d = offs_d < DIM
    x_base = x_ptr + b * s_xb + k * s_xk
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + k * DIM + offs_d, mask=mask_d, other=0.0)[None, :]
    for j in tl.static_range(W):
        wj = tl.load(w_ptr + (k * DIM + offs_d) * W + j, mask=mask_d, other=0.0).to(tl.float32)
        acc += wj[None, :] * _tap(x_base, orders_ptr, k, L, t, mask_t, offs_d, mask_d, s_xl, W - 1 - j, HAS_ORDERS)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    idx_t = _token_index(orders_ptr, k, L, t, mask_t, HAS_ORDERS)
    out_off = ((b * L + idx_t[:, None]) * K + k) * DIM + offs_d[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_d[None, :])


@triton.jit
def _conv_bwd_pre_kernel(
    x_ptr, w_ptr, bias_ptr, orders_ptr, inv_ptr, dout_ptr, dpre_ptr, dw_ptr, dbias_ptr,
    L, K, DIM, n_parts, span,
    s_xb, s_xl, s_xk, s_gb, s_gl, s_gk,
    W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_ORDERS: tl.constexpr,
):  # fmt: skip
    """A program walks ``span`` consecutive step blocks of one (batch, order) and channel block. dweight and dbias
    are accumulated elementwise over the walk and reduced over steps once at its end: one partial per program. The
    programs of batch 0 and channel block 0 also write the inverse orders (the step at which order k visits each
    token) for the dx kernel."""
    pid_p = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_bk = tl.program_id(2)
    b = (pid_bk // K).to(tl.int64)
    k = pid_bk % K
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    x_base = x_ptr + b * s_xb + k * s_xk
    # Tuples built by concatenation in unrolled loops (the compiler takes no tuple() of a generator).
    taps = ()
    acc_w = ()
    for j in tl.static_range(W):
        taps = taps + (tl.load(w_ptr + (k * DIM + offs_d) * W + j, mask=mask_d, other=0.0).to(tl.float32)[None, :],)
        acc_w = acc_w + (tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32),)
    bias = tl.zeros([1, BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(bias_ptr + k * DIM + offs_d, mask=mask_d, other=0.0)[None, :]
    acc_b = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for it in range(span):
        t = (pid_p * span + it) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = t < L
        m_td = mask_t[:, None] & mask_d[None, :]
        idx_t = _token_index(orders_ptr, k, L, t, mask_t, HAS_ORDERS)
        if HAS_ORDERS:
            if (pid_d == 0) & (pid_bk < K):
                tl.store(inv_ptr + k * L + idx_t, t, mask=mask_t)
        g = tl.load(dout_ptr + b * s_gb + k * s_gk + idx_t[:, None] * s_gl + offs_d[None, :], mask=m_td, other=0.0)
        g = g.to(tl.float32)
        # The W taps once, for the pre-activation and for dweight: loaded again after the dpre store below, they
        # were read twice (the compiler cannot tell that store from x).
        xs = ()
        for j in tl.static_range(W):
            xs = xs + (_tap(x_base, orders_ptr, k, L, t, mask_t, offs_d, mask_d, s_xl, W - 1 - j, HAS_ORDERS),)
        if SILU:
            pre = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32) + bias
            for j in tl.static_range(W):
                pre += taps[j] * xs[j]
            sg = tl.sigmoid(pre)
            g = g * sg * (1.0 + pre * (1.0 - sg))
        g = tl.where(m_td, g, 0.0)
        # dpre in scan-step order: the dx pass reads W consecutive steps without a gather.
        tl.store(dpre_ptr + ((b * L + t[:, None]) * K + k) * DIM + offs_d[None, :], g, mask=m_td)
        acc_b += g
        new_w = ()
        for j in tl.static_range(W):
            new_w = new_w + (acc_w[j] + g * xs[j],)
        acc_w = new_w
    part = ((b * n_parts + pid_p) * K + k) * DIM + offs_d
    for j in tl.static_range(W):
        tl.store(dw_ptr + part * W + j, tl.sum(acc_w[j], axis=0), mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + part, tl.sum(acc_b, axis=0), mask=mask_d)


@triton.jit
def _conv_bwd_dx_kernel(
    dpre_ptr, w_ptr, inv_ptr, dx_ptr,
    L, K, DIM,
    W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ORDERS: tl.constexpr, SUM_K: tl.constexpr,
):  # fmt: skip
    """dx at original token positions. Order k visits token p at step s = inv[k, p]; that step feeds the outputs of
    steps s..s+W-1 through taps W-1..0. With SUM_K (one x shared by every order) a program adds all K orders' terms
    and writes dx (B, L, 1, D) once, in x's dtype."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_bk = tl.program_id(2)
    if SUM_K:
        b = pid_bk.to(tl.int64)
        k_lo = 0
        k_hi = K
    else:
        b = (pid_bk // K).to(tl.int64)
        k_lo = pid_bk % K
        k_hi = k_lo + 1
    p = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_p = p < L
    mask_d = offs_d < DIM
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for k in range(k_lo, k_hi):
        step = _token_index(inv_ptr, k, L, p, mask_p, HAS_ORDERS)
        for j in tl.static_range(W):
            s = step + (W - 1) - j
            m = (mask_p & (s >= 0) & (s < L))[:, None] & mask_d[None, :]
            gv = tl.load(dpre_ptr + ((b * L + s[:, None]) * K + k) * DIM + offs_d[None, :], mask=m, other=0.0)
            wj = tl.load(w_ptr + (k * DIM + offs_d) * W + j, mask=mask_d, other=0.0).to(tl.float32)
            acc += gv * wj[None, :]
    out_off = ((b * L + p[:, None]) * (1 if SUM_K else K) + k_lo) * DIM + offs_d[None, :]
    tl.store(dx_ptr + out_off, acc.to(dx_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_d[None, :])


_CONV_CONFIGS: dict[str, tuple] = {}  # "fwd": (BLOCK_T, BLOCK_D, warps); "bwd": the same and SPAN (None: automatic)


def set_conv_config(which: str, config: tuple[int, ...] | None) -> None:
    """Fix the block sizes of the conv's forward (``"fwd"``: BLOCK_T, BLOCK_D, warps) or backward (``"bwd"``: the same
    and optionally SPAN, the step blocks each program of the first backward kernel walks, 0 for all of them; without it
    SPAN is chosen per call); None restores the built-in choice."""
    if which not in ("fwd", "bwd"):
        raise ValueError(f"set_conv_config: which must be 'fwd' or 'bwd', got {which!r}")
    if config is None:
        _CONV_CONFIGS.pop(which, None)
        return
    lengths = (3,) if which == "fwd" else (3, 4)
    if len(config) not in lengths:
        what = "(BLOCK_T, BLOCK_D, warps)" if which == "fwd" else "(BLOCK_T, BLOCK_D, warps[, SPAN])"
        raise ValueError(f"set_conv_config: expected {what} for {which!r}, got {config}")
    bt, bd, warps = (int(v) for v in config[:3])
    if min(bt, bd, warps) < 1 or any(v & (v - 1) for v in (bt, bd, warps)):
        raise ValueError(f"set_conv_config: BLOCK_T, BLOCK_D and warps must be powers of two, got {config}")
    span = int(config[3]) if len(config) == 4 else None
    if span is not None and span < 0:
        raise ValueError(f"set_conv_config: SPAN must be 0 (every step block) or positive, got {config}")
    _CONV_CONFIGS[which] = (bt, bd, warps) if which == "fwd" else (bt, bd, warps, span)


def _conv_config(dim: int, device: torch.device, which: str = "fwd") -> tuple:
    if which in _CONV_CONFIGS:
        return _CONV_CONFIGS[which]
    if device.type != "cuda":  # SPAN 2: the interpreter tests walk several blocks per program and several programs
        return (16, min(next_pow2(dim), 16), 1, *(() if which == "fwd" else (2,)))
    if which == "fwd":
        return 32, min(next_pow2(dim), 128), 4
    # 4-step blocks: the walk's accumulators (W + 1 tiles) stay in registers; fastest in models on an H200 (v9).
    return 4, min(next_pow2(dim), 128), 4, None


def _auto_span(n_tb: int, programs_per_part: int, device: torch.device) -> int:
    """Step blocks per program: all of them while the (batch, order, channel block) programs alone fill every SM about
    four times over; otherwise the sequence is cut into as many parts as that takes. Walking more blocks per program
    was faster at every span measured on an H200 (benchmarks/NOTES-scan.md, v9)."""
    sms = sm_count(device) if device.type == "cuda" else 1
    parts = min(n_tb, max(1, cdiv(4 * sms, max(1, programs_per_part))))
    return cdiv(n_tb, max(1, parts))


def _x_strides(x: torch.Tensor, k: int) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), 0 if x.shape[2] == 1 and k > 1 else x.stride(2)


def conv_fwd(x, weight, bias, orders, activation, out_dtype):
    """Launch the forward kernel: x (B, L, Kx, D), weight (K, D, W) → (B, L, K, D)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    bsz, seqlen, _, dim = x.shape
    k, _, width = weight.shape
    bt, bd, warps = _conv_config(dim, x.device)
    out = torch.empty(bsz, seqlen, k, dim, device=x.device, dtype=out_dtype or x.dtype)
    orders_i = orders.to(device=x.device, dtype=torch.int32).contiguous() if orders is not None else None
    w = weight.contiguous()
    grid = (cdiv(seqlen, bt), cdiv(dim, bd), bsz * k)
    _conv_fwd_kernel[grid](
        x, w, bias.contiguous() if bias is not None else w, orders_i if orders_i is not None else w, out,
        seqlen, k, dim, *_x_strides(x, k),
        W=width, BLOCK_T=bt, BLOCK_D=bd, HAS_BIAS=bias is not None, SILU=activation == "silu",
        HAS_ORDERS=orders_i is not None, num_warps=warps,
    )  # fmt: skip
    return out


def conv_bwd(dout, x, weight, bias, orders, activation):
    """Launch the backward kernels; returns dx (like x), dweight (K, D, W), dbias (K, D) or None."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    bsz, seqlen, kx, dim = x.shape
    k, _, width = weight.shape
    bt, bd, warps, span = _conv_config(dim, x.device, "bwd")
    dev = x.device
    n_tb = cdiv(seqlen, bt)
    if span is None:
        span = _auto_span(n_tb, bsz * k * cdiv(dim, bd), dev)
    span = max(1, n_tb if span == 0 else min(span, n_tb))  # at least 1: an empty sequence launches no program
    n_parts = cdiv(n_tb, span)
    orders_i = orders.to(device=dev, dtype=torch.int32).contiguous() if orders is not None else None
    w = weight.contiguous()
    dpre = torch.empty(bsz, seqlen, k, dim, device=dev, dtype=torch.float32)
    dw_part = torch.empty(bsz, n_parts, k, dim, width, device=dev, dtype=torch.float32)
    db_part = torch.empty(bsz, n_parts, k, dim, device=dev, dtype=torch.float32) if bias is not None else None
    # Inverse orders (the step at which each order visits each token), written by the first kernel.
    inv = torch.empty(orders_i.shape, device=dev, dtype=torch.int32) if orders_i is not None else None
    grid = (n_parts, cdiv(dim, bd), bsz * k)
    _conv_bwd_pre_kernel[grid](
        x, w, bias.contiguous() if bias is not None else w, orders_i if orders_i is not None else w,
        inv if inv is not None else w, dout, dpre,
        dw_part, db_part if db_part is not None else w,
        seqlen, k, dim, n_parts, span, *_x_strides(x, k), *_x_strides(dout, k),
        W=width, BLOCK_T=bt, BLOCK_D=bd, HAS_BIAS=bias is not None, SILU=activation == "silu",
        HAS_ORDERS=orders_i is not None, num_warps=warps,
    )  # fmt: skip
    dx = torch.empty(bsz, seqlen, kx, dim, device=dev, dtype=x.dtype)
    _conv_bwd_dx_kernel[(n_tb, cdiv(dim, bd), bsz * kx)](
        dpre, w, inv if inv is not None else w, dx, seqlen, k, dim,
        W=width, BLOCK_T=bt, BLOCK_D=bd, HAS_ORDERS=inv is not None, SUM_K=kx != k, num_warps=warps,
    )  # fmt: skip
    dw = dw_part.sum((0, 1)).to(weight.dtype)
    db = db_part.sum((0, 1)).to(bias.dtype) if db_part is not None else None
    return dx, dw, db


class CausalConv1dTriton(torch.autograd.Function):
    """Autograd wrapper; the backward recomputes the pre-activation instead of saving it."""

    @staticmethod
    def forward(ctx, x, weight, bias, orders, activation, out_dtype):
        ctx.save_for_backward(x, weight, bias, orders)
        ctx.activation = activation
        return conv_fwd(x, weight, bias, orders, activation, out_dtype)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, orders = ctx.saved_tensors
        dx, dw, db = conv_bwd(dout, x, weight, bias, orders, ctx.activation)
        return dx, dw, db, None, None, None


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    orders: torch.Tensor | None = None,
    activation: str | None = "silu",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Causal depthwise conv1d along each of K orders (Triton). Same semantics as ``causal_conv1d_ref``.

    Args:
        x: (B, L, Kx, D), Kx in {1, K}. weight: (K, D, W). bias: (K, D) or None. orders: (K, L) or None.
        activation: ``"silu"`` or None. out_dtype: output dtype (default ``x.dtype``).

    Returns:
        (B, L, K, D) in original token order.
    """
    return CausalConv1dTriton.apply(x, weight, bias, orders, activation, out_dtype)
