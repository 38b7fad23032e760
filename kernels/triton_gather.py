"""Rows of several tensors at the same indices, in one launch each way: the sampled orders' parameters.

A supernet layer in ``hard`` mode computes only its sampled orders, so it takes their rows of every per-order tensor
(seven parameters stacked on a K axis, and the orders themselves). As ``index_select`` calls that is one kernel per
tensor forward and two per tensor backward (a zero fill and an ``index_add_``), about 22 launches per layer, and an
eager training step of such a supernet is bound by host time per launch. Here:

- forward (``_rows_kernel``): ``out_t[j] = src_t[idx[j]]`` for up to ``MAX_TENSORS`` tensors, one program axis per
  tensor;
- backward (``_rows_kernel`` with ``BWD``): the gradient ``dsrc_t[r] = Σ_{j: idx[j] = r} dout_t[j]`` of every
  tensor, zeros in the rows not taken, written whole (no zero fill first). Repeated indices add up, as
  ``index_select``'s backward does (in fp32, fp64 for fp64 gradients).

Layout: every tensor contiguous, of shape (K, ...) in, (m, ...) out; idx (m,) integer, each in [0, K) (not checked
here: a check would wait for the GPU).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._host import cdiv

__all__ = ["MAX_TENSORS", "gather_rows_fwd", "gather_rows_bwd"]

MAX_TENSORS = 8
_BLOCK = 1024


@triton.jit
def _gather_one(src, dst, idx_ptr, m, n, pid, BLOCK: tl.constexpr):
    """One tensor's share: output elements [pid·BLOCK, (pid+1)·BLOCK) of the (m, n) rows taken."""
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < m * n
    row = offs // n
    col = offs - row * n
    src_row = tl.load(idx_ptr + row, mask=mask, other=0).to(tl.int64)
    tl.store(dst + offs, tl.load(src + src_row * n + col, mask=mask), mask=mask)


@triton.jit
def _scatter_one(grad, dst, idx_ptr, m, k, n, pid, BLOCK: tl.constexpr):
    """One tensor's share of the gradient: elements [pid·BLOCK, (pid+1)·BLOCK) of the whole (k, n) gradient."""
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < k * n
    row = offs // n
    col = offs - row * n
    if dst.dtype.element_ty == tl.float64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(m):
        hit = mask & (row == tl.load(idx_ptr + j).to(tl.int64))
        acc += tl.load(grad + j * n + col, mask=hit, other=0.0).to(acc.dtype)
    tl.store(dst + offs, acc.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rows_one(a, b, idx_ptr, m, k, n, pid, BLOCK: tl.constexpr, BWD: tl.constexpr):
    if BWD:
        _scatter_one(a, b, idx_ptr, m, k, n, pid, BLOCK)
    else:
        _gather_one(a, b, idx_ptr, m, n, pid, BLOCK)


@triton.jit
def _rows_kernel(
    idx_ptr, m, k,
    a0, b0, n0, a1, b1, n1, a2, b2, n2, a3, b3, n3, a4, b4, n4, a5, b5, n5, a6, b6, n6, a7, b7, n7,
    NT: tl.constexpr, BLOCK: tl.constexpr, BWD: tl.constexpr,
):  # fmt: skip
    """Tensor slot t = program axis 1 (a: source, b: destination, n: row length); the forward gathers, the backward
    (``BWD``) scatters the gradients."""
    pid, t = tl.program_id(0), tl.program_id(1)
    if t == 0:
        _rows_one(a0, b0, idx_ptr, m, k, n0, pid, BLOCK, BWD)
    if NT > 1:
        if t == 1:
            _rows_one(a1, b1, idx_ptr, m, k, n1, pid, BLOCK, BWD)
    if NT > 2:
        if t == 2:
            _rows_one(a2, b2, idx_ptr, m, k, n2, pid, BLOCK, BWD)
    if NT > 3:
        if t == 3:
            _rows_one(a3, b3, idx_ptr, m, k, n3, pid, BLOCK, BWD)
    if NT > 4:
        if t == 4:
            _rows_one(a4, b4, idx_ptr, m, k, n4, pid, BLOCK, BWD)
    if NT > 5:
        if t == 5:
            _rows_one(a5, b5, idx_ptr, m, k, n5, pid, BLOCK, BWD)
    if NT > 6:
        if t == 6:
            _rows_one(a6, b6, idx_ptr, m, k, n6, pid, BLOCK, BWD)
    if NT > 7:
        if t == 7:
            _rows_one(a7, b7, idx_ptr, m, k, n7, pid, BLOCK, BWD)


def _slots(pairs: list[tuple[torch.Tensor, torch.Tensor, int]]) -> list:
    """(source, destination, row length) triples as the kernels' flat argument list, padded to MAX_TENSORS slots."""
    args = []
    for src, dst, n in pairs:
        args += [src, dst, n]
    pad = pairs[0]
    for _ in range(MAX_TENSORS - len(pairs)):
        args += [pad[0], pad[1], 0]
    return args


def _row_len(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:])


def _launch(idx: torch.Tensor, srcs: list[torch.Tensor], out_rows: int, k: int, bwd: bool) -> list[torch.Tensor]:
    """One launch over every source: (out_rows, ...) outputs, gathered rows forward, scattered gradients backward."""
    outs = [t.new_empty((out_rows, *t.shape[1:])) for t in srcs]
    work = max((out_rows * _row_len(t) for t in srcs), default=0)
    if work:
        pairs = [(t, o, _row_len(t)) for t, o in zip(srcs, outs)]
        grid = (cdiv(work, _BLOCK), len(srcs))
        _rows_kernel[grid](idx, idx.shape[0], k, *_slots(pairs), NT=len(srcs), BLOCK=_BLOCK, BWD=bwd)
    return outs


def gather_rows_fwd(idx: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[t.index_select(0, idx) for t in tensors]`` (each contiguous, at most ``MAX_TENSORS``) in one launch."""
    return _launch(idx, tensors, idx.shape[0], 0, bwd=False)


def gather_rows_bwd(idx: torch.Tensor, grads: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """The gradients (k, ...) of the tensors :func:`gather_rows_fwd` took rows of, from ``grads`` (m, ...) each."""
    return _launch(idx, grads, k, k, bwd=True)
