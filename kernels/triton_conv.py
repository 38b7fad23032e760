"""Per-order causal depthwise conv1d in Triton (Vim/LocalVim's mixer conv), forward and backward.

Layout: x (B, L, Kx, D) with Kx in {1, K}, weight (K, D, W), bias (K, D), orders (K, L); out (B, L, K, D) in
original token order. Step t of order k sees the tokens that order visits at steps t-W+1..t. Each program owns a
block of steps of one (batch, order) and a block of channels; the W taps are gathered through ``orders[k]`` with
pointer loads and the result is written straight to the token's original position.

Backward: one kernel at original token positions. For each order it finds the step at which that order visits the
token (through the inverse orders), gathers x at the W-1 steps on either side and the output gradient at the W steps
that the token feeds, recomputes those pre-activations, and adds the token's dx, summing the K orders in registers
when they share one x. No pre-activation gradient is written out: each step's own gradient, times its taps, gives
dweight and dbias partials (one per batch, token block and order), summed once afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_pow2
from .triton_scan import _token_index

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
def _inverse_orders_kernel(orders_ptr, inv_ptr, L, BLOCK_T: tl.constexpr):
    """inv[k, orders[k, t]] = t: the step at which order k visits each token."""
    k = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = t < L
    idx = tl.load(orders_ptr + k * L + t, mask=mask, other=0)
    tl.store(inv_ptr + k * L + idx, t, mask=mask)


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, orders_ptr, inv_ptr, dout_ptr, dx_ptr, dw_ptr, dbias_ptr,
    L, K, DIM, n_pb,
    s_xb, s_xl, s_xk, s_gb, s_gl, s_gk,
    W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_ORDERS: tl.constexpr, SUM_K: tl.constexpr,
):  # fmt: skip
    """One pass, at original token positions. Order k visits token p at step s = inv[k, p]; that step feeds the
    outputs of steps s..s+W-1 through taps W-1..0. The program gathers x at steps s-W+1..s+W-1 and the output
    gradient at s..s+W-1, recomputes those W pre-activations and their gradients g, and adds
    Σ_i w[W-1-i]·g(s+i) to dx (all K orders in registers with SUM_K, when they share one x). Each step is owned by
    exactly one token, so g(s) times the taps of step s, summed over the program's tokens, is this program's partial
    of dweight (and g(s) of dbias): one partial per (batch, token block, order)."""
    pid_p = tl.program_id(0)
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
    p = pid_p * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_p = p < L
    mask_d = offs_d < DIM
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for k in range(k_lo, k_hi):
        step = _token_index(inv_ptr, k, L, p, mask_p, HAS_ORDERS)
        x_base = x_ptr + b * s_xb + k * s_xk
        g_base = dout_ptr + b * s_gb + k * s_gk
        taps = ()
        for j in tl.static_range(W):
            taps = taps + (tl.load(w_ptr + (k * DIM + offs_d) * W + j, mask=mask_d, other=0.0).to(tl.float32)[None, :],)
        bias = tl.zeros([1, BLOCK_D], dtype=tl.float32)
        if HAS_BIAS:
            bias += tl.load(bias_ptr + k * DIM + offs_d, mask=mask_d, other=0.0)[None, :]
        # A window of W x rows along order k, slid one step per i: x at steps step+i-W+1 .. step+i (zero outside
        # the sequence). The output gradient is gathered at step+i, the window's last row.
        xs = ()
        for m in tl.static_range(W - 1):
            xs = xs + (_tap(x_base, orders_ptr, k, L, step + m, mask_p, offs_d, mask_d, s_xl, W - 1, HAS_ORDERS),)
        for i in tl.static_range(W):
            s = step + i
            valid = mask_p & (s < L)
            idx = _token_index(orders_ptr, k, L, s, valid, HAS_ORDERS)
            vd = valid[:, None] & mask_d[None, :]
            xs = xs + (tl.load(x_base + idx[:, None] * s_xl + offs_d[None, :], mask=vd, other=0.0).to(tl.float32),)
            g = tl.load(g_base + idx[:, None] * s_gl + offs_d[None, :], mask=vd, other=0.0).to(tl.float32)
            if SILU:
                pre = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32) + bias
                for j in tl.static_range(W):
                    pre += taps[j] * xs[j]
                sg = tl.sigmoid(pre)
                g = g * sg * (1.0 + pre * (1.0 - sg))
            g = tl.where(vd, g, 0.0)
            acc += taps[W - 1 - i] * g
            if i == 0:  # the token's own step: its gradient times the taps is this step's share of dweight
                part = ((b * n_pb + pid_p) * K + k) * DIM + offs_d
                for j in tl.static_range(W):
                    tl.store(dw_ptr + part * W + j, tl.sum(g * xs[j], axis=0), mask=mask_d)
                if HAS_BIAS:
                    tl.store(dbias_ptr + part, tl.sum(g, axis=0), mask=mask_d)
            xs = xs[1:]
        if not SUM_K:
            out_off = ((b * L + p[:, None]) * K + k) * DIM + offs_d[None, :]
            tl.store(dx_ptr + out_off, acc.to(dx_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_d[None, :])
    if SUM_K:
        out_off = (b * L + p[:, None]) * DIM + offs_d[None, :]
        tl.store(dx_ptr + out_off, acc.to(dx_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_d[None, :])


_CONV_CONFIGS: dict[str, tuple] = {}  # "fwd" and "bwd": (BLOCK_T, BLOCK_D, warps)


def set_conv_config(which: str, config: tuple[int, ...] | None) -> None:
    """Fix the block sizes (BLOCK_T, BLOCK_D, warps) of the conv's forward (``"fwd"``) or backward (``"bwd"``)
    kernel; None restores the built-in choice."""
    if which not in ("fwd", "bwd"):
        raise ValueError(f"set_conv_config: which must be 'fwd' or 'bwd', got {which!r}")
    if config is None:
        _CONV_CONFIGS.pop(which, None)
        return
    if len(config) != 3:
        raise ValueError(f"set_conv_config: expected (BLOCK_T, BLOCK_D, warps) for {which!r}, got {config}")
    bt, bd, warps = (int(v) for v in config)
    if min(bt, bd, warps) < 1 or any(v & (v - 1) for v in (bt, bd, warps)):
        raise ValueError(f"set_conv_config: BLOCK_T, BLOCK_D and warps must be powers of two, got {config}")
    _CONV_CONFIGS[which] = (bt, bd, warps)


def _conv_config(dim: int, device: torch.device, which: str = "fwd") -> tuple[int, int, int]:
    if which in _CONV_CONFIGS:
        return _CONV_CONFIGS[which]
    if device.type != "cuda":  # small blocks: the interpreter tests cover several token and channel blocks
        return 16, min(next_pow2(dim), 16), 1
    if which == "fwd":
        return 32, min(next_pow2(dim), 128), 4
    return 16, min(next_pow2(dim), 32), 4


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


def inverse_orders(orders: torch.Tensor) -> torch.Tensor:
    """(K, L) int32 orders → (K, L) int32 inverse: ``inv[k, orders[k, t]] = t``."""
    k, seqlen = orders.shape
    inv = torch.empty_like(orders)
    if seqlen:
        _inverse_orders_kernel[(cdiv(seqlen, 1024), k)](orders, inv, seqlen, BLOCK_T=1024)
    return inv


def conv_bwd(dout, x, weight, bias, orders, activation):
    """Launch the backward kernel; returns dx (like x), dweight (K, D, W), dbias (K, D) or None."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    bsz, seqlen, kx, dim = x.shape
    k, _, width = weight.shape
    bt, bd, warps = _conv_config(dim, x.device, "bwd")
    dev = x.device
    n_pb = cdiv(seqlen, bt)
    orders_i = orders.to(device=dev, dtype=torch.int32).contiguous() if orders is not None else None
    inv = inverse_orders(orders_i) if orders_i is not None else None
    w = weight.contiguous()
    dw_part = torch.empty(bsz, n_pb, k, dim, width, device=dev, dtype=torch.float32)
    db_part = torch.empty(bsz, n_pb, k, dim, device=dev, dtype=torch.float32) if bias is not None else None
    dx = torch.empty(bsz, seqlen, kx, dim, device=dev, dtype=x.dtype)
    sum_k = kx != k
    _conv_bwd_kernel[(n_pb, cdiv(dim, bd), bsz * (1 if sum_k else k))](
        x, w, bias.contiguous() if bias is not None else w, orders_i if orders_i is not None else w,
        inv if inv is not None else w, dout, dx, dw_part, db_part if db_part is not None else w,
        seqlen, k, dim, n_pb, *_x_strides(x, k), *_x_strides(dout, k),
        W=width, BLOCK_T=bt, BLOCK_D=bd, HAS_BIAS=bias is not None, SILU=activation == "silu",
        HAS_ORDERS=orders_i is not None, SUM_K=sum_k, num_warps=warps,
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
