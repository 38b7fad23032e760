"""The mixer's branch merge in Triton: LocalMamba's per-branch channel gate and the weighted sum over K orders.

The multi-order mixer ends every layer with

    out[b, l] = Σ_k w_k · g[b, k] ⊙ y[b, l, k],      g[b, k] = σ(fc2(gelu(fc1(mean_l LN(y[b, l, k])))))

(``g = 1`` without the branch attention). In PyTorch ops this is a chain over the (B, L, K, D) scan output: an fp32
LayerNorm output, its mean, two broadcast products, a sum, and about as many passes again in the backward. Here:

- ``_pool_kernel`` reads y once and gives ``mean_l xhat`` (the LayerNorm's mean over tokens, before its affine) and
  the per-row LayerNorm statistics (B, L, K) that the backward reuses;
- ``_merge_fwd_kernel`` reads y once more and writes the (B, L, D) output, with the small (B, K, D) gate ``w_k·g``
  computed in between by PyTorch;
- backward: ``_merge_dgw_kernel`` reduces ``Σ_l y ⊙ dout`` (the gate's gradient), PyTorch runs the small MLP's
  backward, and ``_merge_dy_kernel`` writes dy once: the merge's term plus the LayerNorm-mean's term
  ``rstd·(a − mean_d a − xhat·mean_d(a·xhat))``, where ``a`` (the gradient of every xhat row) does not depend on l.

The plain merge may carry Mamba's SiLU gate, applied once after the sum (``silu(z) ⊙ Σ_k w_k y_k``, z shared by the
orders): the forward also writes the sum before the gate, and ``_gated_merge_bwd_kernel`` writes dy, dz and the weights'
partial sums in one pass without reading y (unless the weights need a gradient).

Layout: y (B, L, K, D) with unit stride along D; z (B, L, D) with unit stride along D; out and dout (B, L, D)
contiguous; statistics (B, L, K) fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._host import cdiv, next_pow2
from .reference import autocast_off

__all__ = [
    "branch_attn_merge_bwd",
    "branch_attn_merge_fwd",
    "branch_merge_bwd",
    "branch_merge_fwd",
    "gate_mlp",
    "gated_merge_bwd",
    "gated_merge_fwd",
]

_ROWS_PER_PROGRAM = 64  # tokens one reduction program walks (L 197 → 4 programs per (batch, order))


@triton.jit
def _token_tile(pid, pid_d, L, DIM, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Axis-0 program id → (outer index, token block): the outer index, the tile's offsets and masks."""
    n_lblocks = tl.cdiv(L, BLOCK_L)
    offs_l = (pid % n_lblocks) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    return pid // n_lblocks, offs_l, offs_d, offs_l < L, offs_d < DIM


@triton.jit
def _load_y(y_ptr, b, k, offs_l, offs_d, m, s_yb, s_yl, s_yk):
    """The (tokens, channels) tile of y for batch b and order k, in fp32 (b is int64; zeros outside the mask)."""
    rows = y_ptr + b * s_yb + k * s_yk + offs_l[:, None].to(tl.int64) * s_yl + offs_d[None, :]
    return tl.load(rows, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _pool_kernel(
    y_ptr, mean_ptr, rstd_ptr, part_ptr,
    L, K, DIM, rows_per_prog, inv_l, eps,
    s_yb, s_yl, s_yk,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_bk = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bk // K).to(tl.int64)
    k = pid_bk % K
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    l0 = pid_s * rows_per_prog
    for start in range(l0, l0 + rows_per_prog, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        m = mask_l[:, None] & mask_d[None, :]
        yv = _load_y(y_ptr, b, k, offs_l, offs_d, m, s_yb, s_yl, s_yk)
        mu = tl.sum(yv, axis=1) / DIM
        xc = tl.where(m, yv - mu[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / DIM + eps)
        acc += tl.sum(xc * rstd[:, None], axis=0)
        stat = (b * L + offs_l) * K + k
        tl.store(mean_ptr + stat, mu, mask=mask_l)
        tl.store(rstd_ptr + stat, rstd, mask=mask_l)
    tl.store(part_ptr + (pid_bk * tl.num_programs(1) + pid_s) * DIM + offs_d, acc * inv_l, mask=mask_d)


@triton.jit
def _load_z(z_ptr, b, offs_l, offs_d, m, s_zb, s_zl):
    """The (tokens, channels) tile of the gate input z (B, L, D) with unit stride along D, in fp32."""
    return tl.load(z_ptr + b * s_zb + offs_l[:, None].to(tl.int64) * s_zl + offs_d[None, :], mask=m, other=0.0).to(
        tl.float32
    )


@triton.jit
def _merge_fwd_kernel(
    y_ptr, gw_ptr, z_ptr, out_ptr, pre_ptr,
    L, K, DIM,
    s_yb, s_yl, s_yk, s_gb, s_gk, s_gd, s_zb, s_zl,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, HAS_Z: tl.constexpr, STORE_PRE: tl.constexpr,
):  # fmt: skip
    # (batch, token block) on axis 0, which has no 65535 limit
    b, offs_l, offs_d, mask_l, mask_d = _token_tile(tl.program_id(0), tl.program_id(1), L, DIM, BLOCK_L, BLOCK_D)
    b = b.to(tl.int64)
    m = mask_l[:, None] & mask_d[None, :]
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    for k in range(K):
        yv = _load_y(y_ptr, b, k, offs_l, offs_d, m, s_yb, s_yl, s_yk)
        g = tl.load(gw_ptr + b * s_gb + k * s_gk + offs_d * s_gd, mask=mask_d, other=0.0).to(tl.float32)
        acc += yv * g[None, :]
    rows = (b * L + offs_l[:, None]) * DIM + offs_d[None, :]
    if HAS_Z:  # the SiLU gate after the merge; the merge before it is kept for the gate's gradient
        if STORE_PRE:
            tl.store(pre_ptr + rows, acc.to(pre_ptr.dtype.element_ty), mask=m)
        zv = _load_z(z_ptr, b, offs_l, offs_d, m, s_zb, s_zl)
        acc = acc * zv * tl.sigmoid(zv)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _merge_dgw_kernel(
    y_ptr, dout_ptr, part_ptr,
    L, K, DIM, rows_per_prog,
    s_yb, s_yl, s_yk,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_bk = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_d = tl.program_id(2)
    b = (pid_bk // K).to(tl.int64)
    k = pid_bk % K
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    l0 = pid_s * rows_per_prog
    for start in range(l0, l0 + rows_per_prog, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        m = (offs_l < L)[:, None] & mask_d[None, :]
        yv = _load_y(y_ptr, b, k, offs_l, offs_d, m, s_yb, s_yl, s_yk)
        dv = tl.load(dout_ptr + (b * L + offs_l[:, None]) * DIM + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(yv * dv, axis=0)
    tl.store(part_ptr + (pid_bk * tl.num_programs(1) + pid_s) * DIM + offs_d, acc, mask=mask_d)


@triton.jit
def _merge_dy_kernel(
    dout_ptr, gw_ptr, y_ptr, mean_ptr, rstd_ptr, a_ptr, dy_ptr,
    L, K, DIM,
    s_yb, s_yl, s_yk, s_gb, s_gk, s_gd,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, POOL: tl.constexpr,
):  # fmt: skip
    # (batch, order, token block) on axis 0, which has no 65535 limit; axis 1 has a single block of channels when
    # POOL (the LayerNorm terms need whole rows).
    pid_bk, offs_l, offs_d, mask_l, mask_d = _token_tile(tl.program_id(0), tl.program_id(1), L, DIM, BLOCK_L, BLOCK_D)
    b = (pid_bk // K).to(tl.int64)
    k = pid_bk % K
    m = mask_l[:, None] & mask_d[None, :]
    dv = tl.load(dout_ptr + (b * L + offs_l[:, None]) * DIM + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    g = tl.load(gw_ptr + b * s_gb + k * s_gk + offs_d * s_gd, mask=mask_d, other=0.0).to(tl.float32)
    dy = dv * g[None, :]
    if POOL:
        yv = _load_y(y_ptr, b, k, offs_l, offs_d, m, s_yb, s_yl, s_yk)
        stat = (b * L + offs_l) * K + k
        mu = tl.load(mean_ptr + stat, mask=mask_l, other=0.0)
        rstd = tl.load(rstd_ptr + stat, mask=mask_l, other=0.0)
        a = tl.load(a_ptr + pid_bk * DIM + offs_d, mask=mask_d, other=0.0)
        xhat = tl.where(m, (yv - mu[:, None]) * rstd[:, None], 0.0)
        c1 = tl.sum(a, axis=0) / DIM
        c2 = tl.sum(xhat * a[None, :], axis=1) / DIM
        dy += rstd[:, None] * (a[None, :] - c1 - xhat * c2[:, None])
    out = dy_ptr + ((b * L + offs_l[:, None]) * K + k) * DIM + offs_d[None, :]
    tl.store(out, dy.to(dy_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gated_merge_bwd_kernel(
    dout_ptr, w_ptr, y_ptr, z_ptr, pre_ptr, dy_ptr, dz_ptr, part_ptr,
    L, K, DIM,
    s_yb, s_yl, s_yk, s_zb, s_zl,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, NEED_DW: tl.constexpr,
):  # fmt: skip
    """out = silu(z) ⊙ pre, pre = Σ_k w_k y_k: dy_k = w_k · silu(z) ⊙ dout, dz = dout ⊙ pre ⊙ silu'(z), and with
    NEED_DW this program's share of dw_k = Σ y_k ⊙ silu(z) ⊙ dout (one partial per program and order)."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    b, offs_l, offs_d, mask_l, mask_d = _token_tile(pid, pid_d, L, DIM, BLOCK_L, BLOCK_D)
    b = b.to(tl.int64)
    m = mask_l[:, None] & mask_d[None, :]
    rows = (b * L + offs_l[:, None]) * DIM + offs_d[None, :]
    dv = tl.load(dout_ptr + rows, mask=m, other=0.0).to(tl.float32)
    zv = _load_z(z_ptr, b, offs_l, offs_d, m, s_zb, s_zl)
    sz = tl.sigmoid(zv)
    gd = dv * zv * sz
    pre = tl.load(pre_ptr + rows, mask=m, other=0.0).to(tl.float32)
    tl.store(dz_ptr + rows, (dv * pre * sz * (1.0 + zv * (1.0 - sz))).to(dz_ptr.dtype.element_ty), mask=m)
    part = (pid * tl.num_programs(1) + pid_d) * K
    for k in range(K):
        wk = tl.load(w_ptr + k).to(tl.float32)
        out = dy_ptr + ((b * L + offs_l[:, None]) * K + k) * DIM + offs_d[None, :]
        tl.store(out, (wk * gd).to(dy_ptr.dtype.element_ty), mask=m)
        if NEED_DW:
            yv = _load_y(y_ptr, b, k, offs_l, offs_d, m, s_yb, s_yl, s_yk)
            tl.store(part_ptr + part + k, tl.sum(tl.sum(yv * gd, axis=1), axis=0))


def _row_blocks(dim: int) -> tuple[int, int, int]:
    """(BLOCK_L, BLOCK_D, num_warps) for kernels that hold whole rows of D channels (~8K elements per tile)."""
    block_d = next_pow2(dim)
    block_l = max(1, min(16, 8192 // block_d))
    return block_l, block_d, 4 if block_d <= 512 else 8


def _reduce_split(seqlen: int, block_l: int) -> tuple[int, int]:
    """(rows per program, programs along L) for the reductions over tokens; rows are a multiple of BLOCK_L."""
    rows = block_l * max(1, _ROWS_PER_PROGRAM // block_l)
    return rows, cdiv(seqlen, rows)


def _y_strides(y: torch.Tensor) -> tuple[int, int, int]:
    return y.stride(0), y.stride(1), y.stride(2)


def _gw_strides(gw: torch.Tensor) -> tuple[int, int, int]:
    """(batch, order, channel) strides of a gate that may be broadcast: (K,) weights or a (B, K, D) gate."""
    if gw.dim() == 1:
        return 0, gw.stride(0), 0
    return gw.stride(0), gw.stride(1), gw.stride(2)


def _unit_last(y: torch.Tensor) -> torch.Tensor:
    return y if y.stride(-1) == 1 else y.contiguous()


def branch_pool(y: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mean over tokens of the un-affine LayerNorm of every (b, l, k) row: (B, K, D) fp32, and its (B, L, K) stats."""
    y = _unit_last(y)
    bsz, seqlen, k, dim = y.shape
    block_l, block_d, warps = _row_blocks(dim)
    rows, n_s = _reduce_split(seqlen, block_l)
    part = torch.empty(bsz, k, n_s, dim, device=y.device, dtype=torch.float32)
    mean = torch.empty(bsz, seqlen, k, device=y.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _pool_kernel[(bsz * k, n_s)](
        y, mean, rstd, part, seqlen, k, dim, rows, 1.0 / seqlen, eps, *_y_strides(y),
        BLOCK_L=block_l, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return (part[:, :, 0] if n_s == 1 else part.sum(2)), mean, rstd


def _token_tiles(bsz: int, seqlen: int, dim: int) -> tuple[int, int, tuple[int, int]]:
    """(BLOCK_L, BLOCK_D, grid) of the kernels that walk (batch, token block) × channel-block tiles."""
    block_l, block_d = 32, min(128, next_pow2(dim))
    return block_l, block_d, (bsz * cdiv(seqlen, block_l), cdiv(dim, block_d))


def _merge_fwd(
    y: torch.Tensor, gw: torch.Tensor, z: torch.Tensor | None, keep_pre: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    y = _unit_last(y)
    bsz, seqlen, k, dim = y.shape
    out = torch.empty(bsz, seqlen, dim, device=y.device, dtype=y.dtype)
    pre = None
    if z is not None:
        z = _unit_last(z)
        pre_dtype = torch.promote_types(y.dtype, z.dtype)  # fp32 z keeps dz at fp32 precision
        pre = out.new_empty(out.shape if keep_pre else (0,), dtype=pre_dtype)
    block_l, block_d, grid = _token_tiles(bsz, seqlen, dim)
    _merge_fwd_kernel[grid](
        y, gw, z if z is not None else out, out, pre if pre is not None else out, seqlen, k, dim,
        *_y_strides(y), *_gw_strides(gw), *(z.stride()[:2] if z is not None else (0, 0)),
        BLOCK_L=block_l, BLOCK_D=block_d, HAS_Z=z is not None, STORE_PRE=z is not None and keep_pre, num_warps=4,
    )  # fmt: skip
    return out, pre


def branch_merge_fwd(y: torch.Tensor, gw: torch.Tensor) -> torch.Tensor:
    """Σ_k gw[b, k] ⊙ y[b, l, k] → (B, L, D) in y's dtype (fp32 accumulation); gw (K,) or (B, K, D) fp32."""
    return _merge_fwd(y, gw, None)[0]


def gated_merge_fwd(
    y: torch.Tensor, w: torch.Tensor, z: torch.Tensor, keep_pre: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu(z) ⊙ Σ_k w_k · y[b, l, k]`` → (out, pre): (B, L, D), out in y's dtype, pre (the merge before the gate,
    kept for the backward) in the wider of y's and z's; w (K,) fp32, z (B, L, D), fp32 accumulation. Without
    ``keep_pre`` (no backward will follow) pre is an empty tensor and is not written."""
    return _merge_fwd(y, w, z, keep_pre)


def gated_merge_bwd(dout, y, w, z, pre, need_dw: bool):
    """Gradients of :func:`gated_merge_fwd`: (dy, dz, dw or None); dz in z's dtype. Without ``need_dw``, y is read for
    its shape and dtype only (it may be a stride-0 stand-in)."""
    y = _unit_last(y) if need_dw else y
    z, w = _unit_last(z), w.contiguous()
    dout = dout.contiguous()
    bsz, seqlen, k, dim = y.shape
    dy = torch.empty(bsz, seqlen, k, dim, device=dout.device, dtype=y.dtype)
    dz = torch.empty(bsz, seqlen, dim, device=dout.device, dtype=z.dtype)
    block_l, block_d, grid = _token_tiles(bsz, seqlen, dim)
    part = torch.empty(grid[0] * grid[1] if need_dw else 0, k, device=dout.device, dtype=torch.float32)
    _gated_merge_bwd_kernel[grid](
        dout, w, y, z, pre, dy, dz, part, seqlen, k, dim, *_y_strides(y), z.stride(0), z.stride(1),
        BLOCK_L=block_l, BLOCK_D=block_d, NEED_DW=need_dw, num_warps=4,
    )  # fmt: skip
    return dy, dz, (part.sum(0) if need_dw else None)


def _merge_dgw(y: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """Σ_l y[b, l, k] ⊙ dout[b, l] → (B, K, D) fp32."""
    bsz, seqlen, k, dim = y.shape
    block_d = min(128, next_pow2(dim))
    block_l = 32
    rows, n_s = _reduce_split(seqlen, block_l)
    part = torch.empty(bsz, k, n_s, dim, device=y.device, dtype=torch.float32)
    _merge_dgw_kernel[(bsz * k, n_s, cdiv(dim, block_d))](
        y, dout, part, seqlen, k, dim, rows, *_y_strides(y), BLOCK_L=block_l, BLOCK_D=block_d, num_warps=4
    )
    return part[:, :, 0] if n_s == 1 else part.sum(2)


def _merge_dy(dout, gw, y, mean=None, rstd=None, a=None) -> torch.Tensor:
    """dy (B, L, K, D) in y's dtype: ``gw ⊙ dout``, plus the LayerNorm-mean term when ``a`` (B, K, D) is given."""
    bsz, seqlen, k, dim = y.shape
    dy = torch.empty(bsz, seqlen, k, dim, device=y.device, dtype=y.dtype)
    pool = a is not None
    if pool:
        block_l, block_d, warps = _row_blocks(dim)
    else:
        block_l, block_d, warps = 32, min(128, next_pow2(dim)), 4
        mean = rstd = a = dout  # unused
    grid = (bsz * k * cdiv(seqlen, block_l), cdiv(dim, block_d))
    _merge_dy_kernel[grid](
        dout, gw, y, mean, rstd, a, dy, seqlen, k, dim, *_y_strides(y), *_gw_strides(gw),
        BLOCK_L=block_l, BLOCK_D=block_d, POOL=pool, num_warps=warps,
    )  # fmt: skip
    return dy


def branch_merge_bwd(dout: torch.Tensor, y: torch.Tensor, w: torch.Tensor, need_dw: bool):
    """Gradients of :func:`branch_merge_fwd` with (K,) weights: (dy, dw or None). Without ``need_dw``, y is read
    for its shape and dtype only (it may be a stride-0 stand-in)."""
    y = _unit_last(y) if need_dw else y
    dout = dout.contiguous()
    dy = _merge_dy(dout, w, y)
    dw = _merge_dgw(y, dout).sum((0, 2)) if need_dw else None
    return dy, dw


def gate_mlp(pooled, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    """The branch gate ``σ(fc2(gelu(fc1(γ·pooled + β))))`` in fp32: (h0, h1, g), h1 the fc1 output (B, K, H)."""
    h0 = torch.addcmul(norm_bias.float(), pooled, norm_weight.float())
    h1 = F.linear(h0, fc1_weight.float(), fc1_bias.float())
    return h0, h1, torch.sigmoid(F.linear(F.gelu(h1), fc2_weight.float(), fc2_bias.float()))


def branch_attn_merge_fwd(y, w, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    """Forward of the gated merge: out (B, L, D), and for the backward pooled (B, K, D), mean, rstd (B, L, K), the
    gate MLP's fc1 output h1 (B, K, H) and the gate g (B, K, D)."""
    y = _unit_last(y)
    pooled, mean, rstd = branch_pool(y, eps)
    with autocast_off(y.device):
        _, h1, g = gate_mlp(pooled, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
        gw = g * w.float().view(1, -1, 1)
    return branch_merge_fwd(y, gw), pooled, mean, rstd, h1, g


def branch_attn_merge_bwd(dout, y, w, pooled, mean, rstd, h1, g, norm_weight, norm_bias, fc1_weight, fc1_bias,
                          fc2_weight, fc2_bias):  # fmt: skip
    """Gradients of the gated merge: dy, dw, dγ, dβ, dfc1_w, dfc1_b, dfc2_w, dfc2_b (parameters' in fp32).

    The gate's small MLP is differentiated by hand, in as few tensor ops as possible (eager training is bound by the
    host's per-op cost at these sizes), and with plain ops, so that a compiled graph can hold it.
    """
    y = _unit_last(y)
    dout = dout.contiguous()
    rows = pooled.shape[0] * pooled.shape[1]  # B·K rows of the gate MLP
    with autocast_off(y.device):
        wk = w.float().view(1, -1, 1)
        dgw = _merge_dgw(y, dout)  # (B, K, D)
        dw = (dgw * g).sum((0, 2))
        dh2 = torch.ops.aten.sigmoid_backward(dgw * wk, g).view(rows, -1)
        dfc2_w = dh2.t() @ F.gelu(h1).view(rows, -1)
        dh1 = torch.ops.aten.gelu_backward(dh2 @ fc2_weight.float(), h1.view(rows, -1))
        h0 = torch.addcmul(norm_bias.float(), pooled, norm_weight.float()).view(rows, -1)
        dfc1_w = dh1.t() @ h0
        dh0 = dh1 @ fc1_weight.float()
        dnorm_w = (dh0 * pooled.view(rows, -1)).sum(0)
        a = dh0 * (norm_weight.float() * (1.0 / y.shape[1]))  # the gradient of every xhat row of (b, k)
        dy = _merge_dy(dout, g * wk, y, mean, rstd, a)
    return dy, dw, dnorm_w, dh0.sum(0), dfc1_w, dh1.sum(0), dfc2_w, dh2.sum(0)
