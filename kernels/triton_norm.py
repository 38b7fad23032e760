"""RMSNorm over the last dimension in Triton: the plain family's pre-norm on an fp32 residual stream.

``y = x · rstd · weight`` with ``rstd = 1 / sqrt(mean(x²) + eps)`` per row, as ``torch.nn.functional.rms_norm``.

Two ops:

* :func:`rms_norm_bwd`, the backward of a plain RMSNorm (PyTorch's fused forward is already at memory speed and cheap
  to launch): ``dx = rstd · (w·dy − x̂ · mean(w·dy · x̂))`` per row with ``x̂ = x · rstd``, rstd recomputed from the x
  row it loads anyway. Each program walks a run of rows and keeps ``dy · x̂`` as an elementwise sum, reduced over
  rows once at its end: one (C,) partial of dweight per program, summed afterwards. (PyTorch's fused backward spent
  three quarters of its time in the dweight column sum.)
* :func:`add_rms_norm_fwd` / :func:`add_rms_norm_bwd`, the residual add fused with the norm (Vim's fused add-norm with
  an fp32 residual): ``r = residual + x`` (fp32), ``y = rms_norm(r)`` written directly in the dtype the next GEMM
  reads (bf16 under autocast). Forward: one pass writes r and y. Backward: the same kernel as above, with the
  residual's incoming gradient added to dr, written once in fp32 for the residual and once in x's dtype for x.
  In PyTorch the same block is an add, the norm, a cast of its output, and in the backward a cast of the gradient
  and an add of the two gradients of r: five passes over the (rows, C) stream per layer instead of two.

* :func:`layer_norm_fwd` / :func:`layer_norm_bwd`, LayerNorm (the hierarchical family's norms, on rows of 96-768
  channels): ``y = (x − mean) · rstd · weight + bias`` in fp32, written in the dtype asked for (fp32 as autocast's
  LayerNorm gives it, or the next GEMM's dtype, which saves that GEMM's cast). 16 rows per tile: PyTorch's forward
  kernel spends a thread block per row, and at VMamba-T's widths ran at a fifth of the memory rate. The backward
  recomputes mean and rstd from the x row it loads anyway and keeps ``dy · x̂`` and ``dy`` as elementwise sums, one
  (C,) partial of dweight and dbias per program.

Layout: every (rows, C) tensor with unit stride along C.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_pow2
from .triton_scan import sm_count

__all__ = ["add_rms_norm_bwd", "add_rms_norm_fwd", "layer_norm_bwd", "layer_norm_fwd", "rms_norm_bwd"]

_ROWS = 16  # rows per forward tile
# The backwards take 4-row tiles in two warps and about 16 programs per SM: at VMamba-T's and Vim-Ti's widths on an
# H200 that was within 4 % of the best of 128 (rows, warps, programs) tried at every width, and 1.2-1.6x faster than
# the forward's 16-row tiles (benchmarks/norm_bwd_h200/).
_BWD_ROWS = 4
_BWD_PROGRAMS_PER_SM = 16


@triton.jit
def _row_tile(pid, n_rows, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    # the (ROWS, BLOCK_C) tile of rows pid·ROWS… of a (n_rows, C) row-major tensor: columns, their mask, the tile's
    # mask and element offsets
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    mask_c = cols < C
    m = (rows < n_rows)[:, None] & mask_c[None, :]
    return cols, mask_c, m, rows[:, None].to(tl.int64) * C + cols[None, :]


@triton.jit
def _add_rms_fwd_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, r_ptr, n_rows, C, eps,
    HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    cols, mask_c, m, offs = _row_tile(tl.program_id(0), n_rows, C, ROWS, BLOCK_C)
    r = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        r += tl.load(res_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(r_ptr + offs, r, mask=m)
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=1) / C + eps)
    tl.store(y_ptr + offs, (r * rstd[:, None] * w[None, :]).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rms_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, dx_ptr, dw_ptr, dr_in_ptr, dr_out_ptr, n_rows, C, eps, tiles_per_prog,
    HAS_DR_IN: tl.constexpr, STORE_DR: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # x is the norm's input (r of the fused op). dr_in: the gradient reaching r from elsewhere (the residual stream),
    # added to the norm's; dr_out: the sum again in fp32 (the residual's gradient), dx: the sum in dx's dtype.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask_c = cols < C
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    for it in range(tiles_per_prog):
        _, _, m, offs = _row_tile(pid * tiles_per_prog + it, n_rows, C, ROWS, BLOCK_C)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + eps)
        xhat = x * rstd[:, None]
        wdy = dy * w[None, :]
        c = tl.sum(wdy * xhat, axis=1) / C
        dx = (wdy - xhat * c[:, None]) * rstd[:, None]
        if HAS_DR_IN:
            dx += tl.load(dr_in_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if STORE_DR:
            tl.store(dr_out_ptr + offs, dx, mask=m)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
        acc += dy * xhat
    tl.store(dw_ptr + pid * C + cols, tl.sum(acc, axis=0), mask=mask_c)


@triton.jit
def _ln_stats(x, mask_c, C, eps):
    # mean and 1/sqrt(var + eps) of each row of an fp32 (ROWS, BLOCK_C) tile, and x − mean (zero in masked columns)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask_c[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    return xc, rstd


@triton.jit
def _ln_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, n_rows, C, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    cols, mask_c, m, offs = _row_tile(tl.program_id(0), n_rows, C, ROWS, BLOCK_C)
    xc, rstd = _ln_stats(tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32), mask_c, C, eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _ln_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, dx_ptr, dw_ptr, db_ptr, n_rows, C, eps, tiles_per_prog,
    HAS_W: tl.constexpr, NEED_WB: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # dx = rstd · (w·dy − mean(w·dy) − x̂ · mean(w·dy · x̂)); dweight = Σ dy · x̂, dbias = Σ dy, one partial per program.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask_c = cols < C
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    acc_w = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    for it in range(tiles_per_prog):
        _, _, m, offs = _row_tile(pid * tiles_per_prog + it, n_rows, C, ROWS, BLOCK_C)
        xc, rstd = _ln_stats(tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32), mask_c, C, eps)
        xhat = xc * rstd[:, None]
        dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        wdy = dy
        if HAS_W:
            wdy = dy * w[None, :]
        c1 = tl.sum(wdy, axis=1) / C
        c2 = tl.sum(wdy * xhat, axis=1) / C
        dx = (wdy - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
        if NEED_WB:
            acc_w += dy * xhat
            acc_b += dy
    if NEED_WB:
        tl.store(dw_ptr + pid * C + cols, tl.sum(acc_w, axis=0), mask=mask_c)
        tl.store(db_ptr + pid * C + cols, tl.sum(acc_b, axis=0), mask=mask_c)


def _launch_shape(c: int, device: torch.device) -> tuple[int, int]:
    block_c = next_pow2(c)
    warps = 1 if device.type != "cuda" else max(1, min(8, block_c * _ROWS // 1024))
    return block_c, warps


def _bwd_launch(n_rows: int, c: int, device: torch.device) -> tuple[int, int, int, int]:
    """A backward's (BLOCK_C, warps, row tiles per program, programs): about 16 programs per SM on a GPU, two tiles
    per program on the CPU interpreter (so tests walk several tiles in several programs)."""
    block_c = next_pow2(c)
    n_tiles = cdiv(n_rows, _BWD_ROWS)
    if device.type != "cuda":
        per, warps = 2, 1
    else:
        per = max(1, cdiv(n_tiles, _BWD_PROGRAMS_PER_SM * sm_count(device)))
        warps = 2 if block_c <= 1024 else 4
    return block_c, warps, per, cdiv(n_tiles, per)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


def _bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    dx_dtype: torch.dtype,
    dr_in: torch.Tensor | None,
    store_dr: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    x2, dy2 = _rows(x), _rows(dout)
    c = x2.shape[1]
    block_c, warps, per, n_progs = _bwd_launch(x2.shape[0], c, x.device)
    n_rows = x2.shape[0]
    dx = torch.empty(x2.shape, device=x.device, dtype=dx_dtype)
    dr = torch.empty(x2.shape, device=x.device, dtype=torch.float32) if store_dr else None
    dw_part = torch.empty(n_progs, c, device=x.device, dtype=torch.float32)
    dr_in2 = _rows(dr_in) if dr_in is not None else None
    _rms_bwd_kernel[(n_progs,)](
        dy2, x2, weight.contiguous(), dx, dw_part, dr_in2, dr, n_rows, c, eps, per,
        HAS_DR_IN=dr_in is not None, STORE_DR=store_dr, ROWS=_BWD_ROWS, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return dx.view(x.shape), None if dr is None else dr.view(x.shape), dw_part.sum(0).to(weight.dtype)


def rms_norm_bwd(
    dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``F.rms_norm(x, (C,), weight, eps)``: (dx like x, dweight (C,) in weight's dtype)."""
    dx, _, dw = _bwd(dout, x, weight, eps, x.dtype, None, False)
    return dx, dw


def add_rms_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = residual + x`` in fp32 (``x`` alone when residual is None), ``y = rms_norm(r) · weight`` in out_dtype.

    Returns:
        (y, r), both shaped like x.
    """
    x2 = _rows(x)
    res2 = _rows(residual) if residual is not None else None
    n_rows, c = x2.shape
    block_c, warps = _launch_shape(c, x.device)
    y = torch.empty(x2.shape, device=x.device, dtype=out_dtype)
    r = torch.empty(x2.shape, device=x.device, dtype=torch.float32)
    _add_rms_fwd_kernel[(cdiv(n_rows, _ROWS),)](
        x2, res2, weight.contiguous(), y, r, n_rows, c, eps,
        HAS_RES=residual is not None, ROWS=_ROWS, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return y.view(x.shape), r.view(x.shape)


def add_rms_norm_bwd(
    dy: torch.Tensor,
    dr: torch.Tensor | None,
    r: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    x_dtype: torch.dtype,
    has_residual: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Gradients of :func:`add_rms_norm_fwd` from those of y and (optionally) r: (dx in x_dtype, dresidual in fp32 or
    None without a residual input, dweight)."""
    return _bwd(dy, r, weight, eps, x_dtype, dr, has_residual)


def layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """``torch.nn.functional.layer_norm(x, (C,), weight, bias, eps)`` computed in fp32 and written in out_dtype."""
    x2 = _rows(x)
    n_rows, c = x2.shape
    block_c, warps = _launch_shape(c, x.device)
    # x's own shape, contiguous, not a view of a 2-D buffer: a custom Function's view output cannot be modified in
    # place, nn.LayerNorm's output can
    y = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    _ln_fwd_kernel[(cdiv(n_rows, _ROWS),)](
        x2, weight.contiguous() if weight is not None else x2, bias.contiguous() if bias is not None else x2, y,
        n_rows, c, eps, HAS_W=weight is not None, HAS_B=bias is not None, ROWS=_ROWS, BLOCK_C=block_c,
        num_warps=warps,
    )  # fmt: skip
    return y


def layer_norm_bwd(
    dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, eps: float, need_wb: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`layer_norm_fwd` from the output's: (dx like x, dweight (C,) fp32, dbias (C,) fp32), the
    last two None without ``need_wb`` (no affine parameters, or none that learn)."""
    x2, dy2 = _rows(x), _rows(dout)
    n_rows, c = x2.shape
    block_c, warps, per, n_progs = _bwd_launch(n_rows, c, x.device)
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    part = torch.empty(2, n_progs, c, device=x.device, dtype=torch.float32) if need_wb else None
    _ln_bwd_kernel[(n_progs,)](
        dy2, x2, weight.contiguous() if weight is not None else x2, dx, part[0] if need_wb else x2,
        part[1] if need_wb else x2, n_rows, c, eps, per,
        HAS_W=weight is not None, NEED_WB=need_wb, ROWS=_BWD_ROWS, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    if not need_wb:
        return dx, None, None
    return dx, part[0].sum(0), part[1].sum(0)  # two tensors: a registered op's outputs may not alias
