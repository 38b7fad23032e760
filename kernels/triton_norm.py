"""The backward of RMSNorm over the last dimension in Triton (the plain family's pre-norm on an fp32 residual).

``y = x · rstd · weight`` with ``rstd = 1 / sqrt(mean(x²) + eps)`` per row, as ``torch.nn.functional.rms_norm``, whose
fused forward is already at memory speed and cheap to launch. The backward is
``dx = rstd · (w·dy − x̂ · mean(w·dy · x̂))`` per row with ``x̂ = x · rstd``, rstd recomputed from the x row it loads
anyway. Each program walks a run of rows and keeps ``dy · x̂`` as an elementwise sum, reduced over rows once at its
end: one (C,) partial of dweight per program, summed afterwards. (PyTorch's fused backward spent three quarters of its
time in the dweight column sum.)

Layout: x and dy (rows, C) with unit stride along C; dx in x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_scan import sm_count

__all__ = ["rms_norm_bwd"]

_ROWS = 16  # rows per tile


@triton.jit
def _rms_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, dx_ptr, dw_ptr, n_rows, C, eps, tiles_per_prog,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask_c = cols < C
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    for it in range(tiles_per_prog):
        rows = (pid * tiles_per_prog + it) * ROWS + tl.arange(0, ROWS)
        mask_r = rows < n_rows
        m = mask_r[:, None] & mask_c[None, :]
        offs = rows[:, None].to(tl.int64) * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + eps)
        xhat = x * rstd[:, None]
        wdy = dy * w[None, :]
        c = tl.sum(wdy * xhat, axis=1) / C
        dx = (wdy - xhat * c[:, None]) * rstd[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
        acc += dy * xhat
    tl.store(dw_ptr + pid * C + cols, tl.sum(acc, axis=0), mask=mask_c)


def _launch_shape(x: torch.Tensor) -> tuple[int, int, int]:
    c = x.shape[-1]
    block_c = triton.next_power_of_2(c)
    warps = 1 if x.device.type != "cuda" else max(1, min(8, block_c * _ROWS // 1024))
    return c, block_c, warps


def _tiles_per_program(n_tiles: int, device: torch.device) -> int:
    """Row tiles per backward program: enough programs for about four per SM (two on the CPU interpreter, so tests
    walk several tiles in several programs)."""
    if device.type != "cuda":
        return 2
    sms = sm_count(device)
    return max(1, -(-n_tiles // (4 * sms)))


def rms_norm_bwd(
    dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``F.rms_norm(x, (C,), weight, eps)``: (dx like x, dweight (C,) in weight's dtype)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    dy2 = dout.reshape(-1, x.shape[-1]).contiguous()
    c, block_c, warps = _launch_shape(x2)
    n_rows = x2.shape[0]
    n_tiles = triton.cdiv(n_rows, _ROWS)
    per = _tiles_per_program(n_tiles, x.device)
    n_progs = triton.cdiv(n_tiles, per)
    dx = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    dw_part = torch.empty(n_progs, c, device=x.device, dtype=torch.float32)
    _rms_bwd_kernel[(n_progs,)](
        dy2, x2, weight.contiguous(), dx, dw_part, n_rows, c, eps, per,
        ROWS=_ROWS, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return dx.view(x.shape), dw_part.sum(0).to(weight.dtype)
