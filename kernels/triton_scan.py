"""Fused K-order Mamba-1 selective scan in Triton: forward and backward, every order in one launch.

Layout (token-major, see :mod:`kernels.reference`): u (B, L, Ku, D), delta (B, L, K, D), A (K, D, N) fp32,
B/C (B, L, K, N), z (B, L, Kz, D), orders (K, L). Each program owns one (batch, order) pair and ``BLOCK_D``
channels, and walks the order in chunks of ``BLOCK_T`` steps: it gathers the chunk's token rows through
``orders[k]`` with pointer loads (a token's channels are contiguous, so a gathered row is a coalesced read), runs
the chunk as a parallel affine scan ``(a1, b1) ∘ (a2, b2) = (a1·a2, b1·a2 + b2)`` over a (T, D, N) register tile,
carries the fp32 state to the next chunk, and writes outputs straight back to the tokens' original positions.
Nothing is ever permuted in memory, forward or backward.

The forward saves the state at every chunk start (fp32). The backward walks the chunks from last to first,
recomputes the chunk's states from the saved start state, runs the adjoint recurrence
``h_t = C_t·g_t + a_{t+1}·h_{t+1}`` as a reverse scan, and gets ``a_t·x_{t-1}`` as ``x_t - Δ_t·B_t·u_t``, so no
state is ever rebuilt by dividing by ``exp(Δ·A)``. Reductions over channels (dB, dC) and over the batch (dA, dD,
ddelta_bias) go through per-program partial buffers summed afterwards: deterministic, no atomics.

Two tile layouts share these launchers, picked by the configuration (:func:`scan_config`): the (T, D, N) kernels
below, and the (T, N, D) kernels of :mod:`kernels.triton_scan_nd` (channels across lanes, so sums over N stay in a
thread), which measured faster on an H100 and are the GPU default. benchmarks/NOTES-scan.md has the numbers.
"""

from __future__ import annotations

import functools
import json
import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._host import cdiv, next_pow2

__all__ = ["load_scan_configs", "selective_scan_triton", "scan_bwd", "scan_config", "scan_fwd", "set_scan_config"]

_LOG2E = math.log2(math.e)
# Automatic split of the backward and the forward along L: aim for this many warps per SM (see _segments).
_SEG_WARPS_PER_SM = 32
# Compiled for a GPU, not run by the CPU interpreter: the kernels then use hardware instructions the interpreter has no
# counterpart for (lg2.approx, the bf16x2 conversions and adds) and fall back to portable code otherwise.
_COMPILED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on"))


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # Composition of x -> a1·x + b1 then x -> a2·x + b2.
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _log2(x):
    # The hardware log2 (lg2.approx) in compiled code; tl.log2 lowers to libdevice's precise one (~50 instructions).
    # The interpreter has no libdevice and takes numpy's.
    if _COMPILED:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _softplus(x):
    # ln(1 + e^x) through the hardware exp2/log2 (tl.exp and tl.log lower to ~30 instructions per element, these to
    # two MUFU ops), with mamba-ssm's threshold: identity above 20 (exp would overflow long before log1p matters).
    e = tl.exp2(tl.minimum(x, 20.0) * 1.4426950408889634)
    return tl.where(x <= 20.0, _log2(1.0 + e) * 0.6931471805599453, x)


@triton.jit
def _sigmoid_from_softplus(x, sp):
    # σ(x) = e^(x − softplus(x)): one exp2 given the softplus the kernel already has (no cancellation for x < 0, and
    # exactly 1 above the threshold, where softplus(x) = x).
    return tl.exp2((x - sp) * 1.4426950408889634)


@triton.jit
def _sigmoid(x):
    # 1 / (1 + e^-x) with the hardware exp2 (tl.sigmoid lowers to the libdevice exp).
    return 1.0 / (1.0 + tl.exp2(-x * 1.4426950408889634))


@triton.jit
def _token_index(orders_ptr, k, L, t, mask, HAS_ORDERS: tl.constexpr, IDX64: tl.constexpr = True):
    # Storage positions of steps t along order k; the identity without orders. int64 for the row offsets unless the
    # launcher found that every offset inside one (batch, order) slice fits in int32 (IDX64 off): 32-bit row
    # arithmetic takes about half the instructions per gathered row.
    if HAS_ORDERS:
        idx = tl.load(orders_ptr + k * L + t, mask=mask, other=0)
    else:
        idx = t
    if IDX64:
        idx = idx.to(tl.int64)
    return idx


@triton.jit
def _slice_ptr(ptr, b, k, s_b, s_k, WIDE: tl.constexpr = True):
    # Start of one (batch, order) slice of a (B, L, K, ·) tensor; b is int64. With WIDE the order index is widened
    # too: an order-major tensor's order stride is B·L·D, and (K - 1)·B·L·D passes 2**31 at large batch or resolution
    # (the launchers pass IDX64, which _needs_int64 sets for that case).
    if WIDE:
        return ptr + b * s_b + k.to(tl.int64) * s_k
    else:
        return ptr + b * s_b + k * s_k


@triton.jit
def _load_bwd_rows(
    orders_ptr, u_base, d_base, g_base, z_base, k, L, c, s_ul, s_dl, s_zl, s_gl, offs_t, offs_d, mask_d,
    BLOCK_T: tl.constexpr, HAS_Z: tl.constexpr, HAS_ORDERS: tl.constexpr, NEXT_DELTA: tl.constexpr = True,
    IDX64: tl.constexpr = True,
):  # fmt: skip
    # The backward's per-chunk token rows (raw, in their storage dtype); c = -1 gives a fully masked chunk.
    t = c * BLOCK_T + offs_t
    mask_t = (t >= 0) & (t < L)
    mask_t1 = (t >= 0) & ((t + 1) < L)
    idx = _token_index(orders_ptr, k, L, t, mask_t, HAS_ORDERS, IDX64)
    m_td = mask_t[:, None] & mask_d[None, :]
    m_t1d = mask_t1[:, None] & mask_d[None, :]
    u = tl.load(u_base + idx[:, None] * s_ul + offs_d[None, :], mask=m_td, other=0.0)
    dt = tl.load(d_base + idx[:, None] * s_dl + offs_d[None, :], mask=m_td, other=0.0)
    if NEXT_DELTA:  # Δ of the next step (the adjoint's decay), unless the kernel derives it from this step's
        idx1 = _token_index(orders_ptr, k, L, t + 1, mask_t1, HAS_ORDERS, IDX64)
        dt1 = tl.load(d_base + idx1[:, None] * s_dl + offs_d[None, :], mask=m_t1d, other=0.0)
    else:
        dt1 = dt
    dy = tl.load(g_base + idx[:, None] * s_gl + offs_d[None, :], mask=m_td, other=0.0)
    if HAS_Z:
        zt = tl.load(z_base + idx[:, None] * s_zl + offs_d[None, :], mask=m_td, other=0.0)
    else:
        zt = dy
    return idx, u, dt, dt1, dy, zt


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, orders_ptr, y_ptr, states_ptr,
    L, K, DIM, N, n_chunks,
    s_ub, s_ul, s_uk, s_db, s_dl, s_dk, s_bb, s_bl, s_bk, s_bn, s_cb, s_cl, s_ck, s_cn,
    s_zb, s_zl, s_zk, s_yb, s_yl, s_yk,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_ORDERS: tl.constexpr, SAVE_STATES: tl.constexpr, STORE_Y: tl.constexpr = True,
):  # fmt: skip
    pid_d = tl.program_id(0)
    pid_bk = tl.program_id(1)
    # 64-bit offsets: chunk states and partial buffers exceed 2**31 elements at LocalVMamba sizes.
    b = (pid_bk // K).to(tl.int64)
    k = pid_bk % K
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    mask_d = offs_d < DIM
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    # exp(Δ·A) = exp2(Δ·A·log2 e): A pre-scaled once per program.
    A2 = (
        tl.load(A_ptr + (k * DIM + offs_d[:, None]) * N + offs_n[None, :], mask=mask_dn, other=0.0) * 1.4426950408889634
    )
    if HAS_BIAS:
        bias = tl.load(bias_ptr + k * DIM + offs_d, mask=mask_d, other=0.0)
    if HAS_D:
        dskip = tl.load(D_ptr + k * DIM + offs_d, mask=mask_d, other=0.0)
    u_base = _slice_ptr(u_ptr, b, k, s_ub, s_uk)
    d_base = _slice_ptr(delta_ptr, b, k, s_db, s_dk)
    b_base = _slice_ptr(B_ptr, b, k, s_bb, s_bk)
    c_base = _slice_ptr(C_ptr, b, k, s_cb, s_ck)
    z_base = _slice_ptr(z_ptr, b, k, s_zb, s_zk)
    y_base = _slice_ptr(y_ptr, b, k, s_yb, s_yk)
    st_base = states_ptr + pid_bk.to(tl.int64) * n_chunks * DIM * N
    x = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    for c in range(0, n_chunks):
        t = c * BLOCK_T + offs_t
        mask_t = t < L
        idx = _token_index(orders_ptr, k, L, t, mask_t, HAS_ORDERS)
        if SAVE_STATES:
            tl.store(st_base + (c * DIM + offs_d[:, None]) * N + offs_n[None, :], x, mask=mask_dn)
        m_td = mask_t[:, None] & mask_d[None, :]
        m_tn = mask_t[:, None] & mask_n[None, :]
        u = tl.load(u_base + idx[:, None] * s_ul + offs_d[None, :], mask=m_td, other=0.0).to(tl.float32)
        dt = tl.load(d_base + idx[:, None] * s_dl + offs_d[None, :], mask=m_td, other=0.0).to(tl.float32)
        Bt = tl.load(b_base + idx[:, None] * s_bl + offs_n[None, :] * s_bn, mask=m_tn, other=0.0).to(tl.float32)
        Ct = tl.load(c_base + idx[:, None] * s_cl + offs_n[None, :] * s_cn, mask=m_tn, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt = dt + bias[None, :]
        if SOFTPLUS:
            dt = _softplus(dt)
        # Padded steps must be the identity map (a = 1, b = 0) so the chunk's last row is the true last state.
        dt = tl.where(m_td, dt, 0.0)
        a = tl.exp2(dt[:, :, None] * A2[None, :, :])
        bx = (dt * u)[:, :, None] * Bt[:, None, :]
        P, S = tl.associative_scan((a, bx), axis=0, combine_fn=_affine_combine)
        xs = P * x[None, :, :] + S
        x = tl.sum(tl.where(offs_t[:, None, None] == BLOCK_T - 1, xs, 0.0), axis=0)
        if STORE_Y:  # off for the backward's state recompute: no C·h, no gate, no store
            y = tl.sum(xs * Ct[:, None, :], axis=2)
            if HAS_D:
                y += u * dskip[None, :]
            if HAS_Z:
                zt = tl.load(z_base + idx[:, None] * s_zl + offs_d[None, :], mask=m_td, other=0.0).to(tl.float32)
                y = y * zt * _sigmoid(zt)
            tl.store(y_base + idx[:, None] * s_yl + offs_d[None, :], y.to(y_ptr.dtype.element_ty), mask=m_td)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, orders_ptr, dy_ptr, states_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    L, K, DIM, N, n_chunks, BATCH,
    s_ub, s_ul, s_uk, s_db, s_dl, s_dk, s_bb, s_bl, s_bk, s_bn, s_cb, s_cl, s_ck, s_cn,
    s_zb, s_zl, s_zk, s_gb, s_gl, s_gk,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_ORDERS: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    pid_bk = tl.program_id(1)
    # 64-bit offsets: chunk states and partial buffers exceed 2**31 elements at LocalVMamba sizes.
    b = (pid_bk // K).to(tl.int64)
    k = pid_bk % K
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    mask_d = offs_d < DIM
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + (k * DIM + offs_d[:, None]) * N + offs_n[None, :], mask=mask_dn, other=0.0)
    A2 = A * 1.4426950408889634
    if HAS_BIAS:
        bias = tl.load(bias_ptr + k * DIM + offs_d, mask=mask_d, other=0.0)
    if HAS_D:
        dskip = tl.load(D_ptr + k * DIM + offs_d, mask=mask_d, other=0.0)
    u_base = _slice_ptr(u_ptr, b, k, s_ub, s_uk)
    d_base = _slice_ptr(delta_ptr, b, k, s_db, s_dk)
    b_base = _slice_ptr(B_ptr, b, k, s_bb, s_bk)
    c_base = _slice_ptr(C_ptr, b, k, s_cb, s_ck)
    z_base = _slice_ptr(z_ptr, b, k, s_zb, s_zk)
    g_base = _slice_ptr(dy_ptr, b, k, s_gb, s_gk)
    st_base = states_ptr + pid_bk.to(tl.int64) * n_chunks * DIM * N
    # Gradient outputs are contiguous (B, L, K, D) / partials (n_dblocks, B, L, K, N).
    out_base = (b * L * K + k) * DIM
    part_base = ((pid_d.to(tl.int64) * BATCH + b) * L * K + k) * N
    h_carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for ci in range(0, n_chunks):
        c = n_chunks - 1 - ci
        t = c * BLOCK_T + offs_t
        mask_t = t < L
        m_td = mask_t[:, None] & mask_d[None, :]
        m_t1d = ((t + 1) < L)[:, None] & mask_d[None, :]
        m_tn = mask_t[:, None] & mask_n[None, :]
        idx, u, dt_pre, dt1, g, zt = _load_bwd_rows(
            orders_ptr, u_base, d_base, g_base, z_base, k, L, c, s_ul, s_dl, s_zl, s_gl, offs_t, offs_d, mask_d,
            BLOCK_T, HAS_Z, HAS_ORDERS,
        )  # fmt: skip
        u, dt_pre, dt1, g, zt = (
            u.to(tl.float32),
            dt_pre.to(tl.float32),
            dt1.to(tl.float32),
            g.to(tl.float32),
            zt.to(tl.float32),
        )
        Bt = tl.load(b_base + idx[:, None] * s_bl + offs_n[None, :] * s_bn, mask=m_tn, other=0.0).to(tl.float32)
        Ct = tl.load(c_base + idx[:, None] * s_cl + offs_n[None, :] * s_cn, mask=m_tn, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt_pre = dt_pre + bias[None, :]
            dt1 = dt1 + bias[None, :]
        if SOFTPLUS:
            dt_sp = _softplus(dt_pre)
            dt = dt_sp
            dt1 = _softplus(dt1)
        else:
            dt = dt_pre
        dt = tl.where(m_td, dt, 0.0)
        dt1 = tl.where(m_t1d, dt1, 0.0)
        # Recompute this chunk's states from the saved chunk-start state.
        x_in = tl.load(st_base + (c * DIM + offs_d[:, None]) * N + offs_n[None, :], mask=mask_dn, other=0.0)
        a = tl.exp2(dt[:, :, None] * A2[None, :, :])
        dtu = dt * u
        bx = dtu[:, :, None] * Bt[:, None, :]
        P, S = tl.associative_scan((a, bx), axis=0, combine_fn=_affine_combine)
        xs = P * x_in[None, :, :] + S
        if HAS_Z:
            y = tl.sum(xs * Ct[:, None, :], axis=2)
            if HAS_D:
                y += u * dskip[None, :]
            sz = _sigmoid(zt)
            dz = g * y * sz * (1.0 + zt * (1.0 - sz))
            g = g * zt * sz
            tl.store(dz_ptr + out_base + idx[:, None] * (K * DIM) + offs_d[None, :], dz, mask=m_td)
        # Adjoint: h_t = C_t·g_t + a_{t+1}·h_{t+1}, a reverse scan with the next step's decay.
        a1 = tl.exp2(dt1[:, :, None] * A2[None, :, :])
        cg = Ct[:, None, :] * g[:, :, None]
        Pr, H = tl.associative_scan((a1, cg), axis=0, combine_fn=_affine_combine, reverse=True)
        h = H + Pr * h_carry[None, :, :]
        h_carry = tl.sum(tl.where(offs_t[:, None, None] == 0, h, 0.0), axis=0)
        w = h * (xs - bx)  # h_t · a_t · x_{t-1}
        hB = tl.sum(h * Bt[:, None, :], axis=2)
        ddt = tl.sum(w * A[None, :, :], axis=2) + u * hB
        du = dt * hB
        if HAS_D:
            du += dskip[None, :] * g
            dD_acc += tl.sum(g * u, axis=0)
        dA_acc += tl.sum(w * dt[:, :, None], axis=0)
        dB = tl.sum(h * dtu[:, :, None], axis=1)
        dC = tl.sum(xs * g[:, :, None], axis=1)
        if SOFTPLUS:
            ddt = ddt * _sigmoid_from_softplus(dt_pre, dt_sp)
        ddt = tl.where(m_td, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=0)
        tl.store(du_ptr + out_base + idx[:, None] * (K * DIM) + offs_d[None, :], du, mask=m_td)
        tl.store(ddelta_ptr + out_base + idx[:, None] * (K * DIM) + offs_d[None, :], ddt, mask=m_td)
        tl.store(dB_ptr + part_base + idx[:, None] * (K * N) + offs_n[None, :], dB, mask=m_tn)
        tl.store(dC_ptr + part_base + idx[:, None] * (K * N) + offs_n[None, :], dC, mask=m_tn)
    tl.store(dA_ptr + ((b * K + k) * DIM + offs_d[:, None]) * N + offs_n[None, :], dA_acc, mask=mask_dn)
    vec_off = (b * K + k) * DIM + offs_d
    if HAS_D:
        tl.store(dD_ptr + vec_off, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + vec_off, dbias_acc, mask=mask_d)


# Block sizes per (BLOCK_N, long sequence) measured best on an H100 by ``kernels/bench.py --tune``; anything not
# listed falls back to the heuristic in :func:`scan_config`. ``set_scan_config`` overrides an entry at run time.
_TUNED: dict[tuple[int, bool], tuple[int, ...]] = {}
_LONG = 1024
_N1_CAPPED = 512  # N = 1 beyond this many steps: the register-capped 8-step backward (scan_config)


def register_cap_ok(config: tuple[int, ...] | list[int]) -> bool:
    """Whether a config's register cap (11th number, MAXNREG) is one ptxas can meet: absent, 0 (none) or 64-255."""
    return len(config) < 11 or config[10] == 0 or 64 <= config[10] <= 255


def set_scan_config(dstate: int, seqlen: int, config: tuple[int, ...] | None) -> None:
    """Pin ``(BLOCK_T, BLOCK_D, num_warps)`` for GPU scans with this state size and sequence-length class."""
    key = (next_pow2(dstate), seqlen > _LONG)
    if config is None:
        _TUNED.pop(key, None)
    else:
        _TUNED[key] = tuple(config)


def load_scan_configs(path: str) -> list[tuple[int, int, tuple[int, ...]]]:
    """Pin the block sizes of a ``kernels.bench --configs-out`` file: a list of ``{"N", "L", "config"}`` entries.

    Raises:
        ValueError: one line naming the file and what is wrong with it.
    """
    hint = "write one with `python -m kernels.bench --tune --configs-out FILE`"
    try:
        with open(path) as f:
            entries = json.load(f)
        pinned = [(int(e["N"]), int(e["L"]), tuple(int(x) for x in e["config"])) for e in entries]
    except FileNotFoundError:
        raise ValueError(f"block-size file not found at {os.path.abspath(path)}; {hint}") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a block-size file ({type(err).__name__}: {err}); {hint}") from None
    bad = [c for _, _, c in pinned if len(c) not in (3, 7, 8, 9, 10, 11, 12)]
    if bad:
        raise ValueError(f"{path}: a config has 3 or 7 to 12 numbers, got {list(bad[0])}; {hint}")
    bad = [c for _, _, c in pinned if not register_cap_ok(c)]
    if bad:
        raise ValueError(f"{path}: the register cap (11th number) is 0 or 64-255, got {list(bad[0])}; {hint}")
    for n, seqlen, config in pinned:
        set_scan_config(n, seqlen, config)
    return pinned


def scan_config(dim: int, dstate: int, seqlen: int, device: torch.device) -> tuple[int, ...]:
    """Kernel configuration for ``dim`` channels, ``dstate`` states, ``seqlen`` steps.

    Three numbers ``(BLOCK_T, BLOCK_D, num_warps)`` select the (T, D, N)-tile kernels of this module; seven to twelve
    numbers ``(BLOCK_T, BLOCK_D, num_warps, fwd BLOCK_T, fwd BLOCK_D, fwd num_warps, GROUP_N[, PREFETCH[,
    ONE_DECAY[, SEGMENTS[, MAXNREG[, FWD_SEGMENTS]]]]])`` select the (T, N, D)-tile kernels of
    :mod:`kernels.triton_scan_nd` (PREFETCH and ONE_DECAY switch on the backward's prefetch and its one-decay adjoint,
    off when absent; SEGMENTS splits the one-decay backward along L, 0 or absent: automatic, see ``_segments``;
    MAXNREG, 0 or 64-255, caps the registers per thread of the backward's chunk kernel (not the split's first pass),
    0 or absent: the compiler's choice, up to 255 for a one-warp program, which allows 8 such programs per SM;
    FWD_SEGMENTS splits the forward along L, 0 or absent: automatic, see ``_fwd_segments``). The first number is
    always the saved-state interval.

    The forward's chunk and the saved-state interval must divide one another. Under the CPU interpreter, whose scan
    runs element by element, the tiles are kept tiny.
    """
    bn = next_pow2(dstate)
    dim_cap = max(16, next_pow2(dim))
    if device.type != "cuda":
        return 8, min(next_pow2(dim), 8), 1
    tuned = _TUNED.get((bn, seqlen > _LONG))
    if tuned is not None:
        if len(tuned) != 3:
            return tuned
        bt, bd, warps = tuned
        return bt, min(bd, dim_cap), warps
    # Defaults from ``kernels/bench.py --tune`` (benchmarks/NOTES-scan.md): the (T, N, D)-tile kernels with one warp
    # and one channel per lane won for N = 16 and N = 1 on an H100 (the (T, D, N) kernels took 1.2-1.9x as long);
    # on an H200 the N = 1 backward is 1.9x faster with 4-step chunks and its prefetch, while the forward keeps
    # 32-step chunks and saves every 4th state; the one-decay backward (unrolled recurrences, no shuffles but the
    # dB/dC channel sums) took the N = 16 backward from 7.5 to 4.3 ms (scan_tuning_h200_run3.json).
    # For N = 1 beyond 512 steps the backward takes 8-step chunks under a 128-register cap (16 programs per SM, a few
    # spills) at the time of 4-step chunks, and the forward saves every 8th state instead of every 4th. Kernel time
    # on an H200: VMamba-T stage 1 (L 3136) 1.72 -> 1.59 ms, stage 2 (L 784) 0.75 -> 0.71 ms; stage 3 (L 196) was
    # slower, 0.34 -> 0.37 ms (benchmarks/NOTES-scan.md v8; the crossover between 196 and 784 was not measured).
    if bn == 1:
        return (8, 32, 1, 32, 32, 1, 1, 1, 1, 0, 128) if seqlen > _N1_CAPPED else (4, 32, 1, 32, 32, 1, 1, 1, 1)
    return 8, 32, 1, min(8, max(2, 64 // bn)), 32, 1, min(bn, 4), 0, 1


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (looked up once per device: the launchers ask on every call)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _split(
    want: int, n_chunks: int, programs: int, warps: int, per_sm: int, min_chunks: int, below: int, device: torch.device
) -> tuple[int, int]:
    """(segments, chunks per segment) of a split along L: ``want`` segments if positive, else, on a GPU where the
    unsplit launch has fewer than ``below`` programs per SM, enough for about ``per_sm`` warps per SM, each segment at
    least ``min_chunks`` long."""
    if want <= 0:
        if device.type != "cuda":
            return 1, n_chunks
        sms = sm_count(device)
        if programs >= below * sms:
            return 1, n_chunks
        want = min(cdiv(per_sm * sms // warps, programs), n_chunks // min_chunks)
    want = max(1, min(want, n_chunks))
    seg_chunks = cdiv(n_chunks, want)
    return cdiv(n_chunks, seg_chunks), seg_chunks


def _segments(config: tuple[int, ...], n_chunks: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(segments, chunks per segment) of the backward's split along L.

    The 10th config number asks for a segment count (0: choose). Chosen only when the unsplit backward has fewer
    programs than four per SM (long L at small batch): then about 32 one-warp programs per SM, each segment at
    least 8 chunks long. With more programs the first pass costs more than the added occupancy gains (H200: VMamba-T
    stage 1, 1,536 programs, 1.88 → 2.19-2.46 ms; L 1024 at batch 24, 576 programs, 1.84 → 2.08-2.16 ms); below,
    it pays (L 2048 at batch 12, 288 programs, 2.66 → 1.64 ms fwd+bwd with 16 segments, NOTES-scan.md v12; L 4096 at
    batch 6, 144 programs, 5.55 → 2.49 ms with 32 segments, v5)."""
    want = config[9] if len(config) > 9 else 0
    return _split(want, n_chunks, programs, config[2], _SEG_WARPS_PER_SM, 8, 4, device)


def _fwd_segments(config: tuple[int, ...], n_chunks: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(segments, chunks per segment) of the forward's split along L, in forward chunks.

    The 12th config number asks for a segment count (0 or absent: choose). A first pass writes each segment's end
    state from a zero start and its ΣΔ; the chunk pass folds those of the segments before its own into its starting
    state, so a split costs a second walk over u, Δ and B. Chosen, as the backward's, when the unsplit forward has
    fewer than four programs per SM: then about 32 warps per SM, each segment at least 4 chunks long. H200, N 16,
    dim 192, K 4 (NOTES-scan.md v12): L 2048 at batch 12 (288 programs) 0.54 → 0.37 ms with 16 segments, L 4096
    at batch 6 1.06 → 0.39 ms with 32; at L 1024 and batch 24 (576 programs) the best split gained 4 %, and at 768
    programs and more none gained."""
    want = config[11] if len(config) > 11 else 0
    return _split(want, n_chunks, programs, config[5], _SEG_WARPS_PER_SM, 4, 4, device)


_PACKED_SUMS = False


def set_packed_channel_sums(enabled: bool) -> None:
    """Opt in (or out again) to a faster, less precise backward: when B and C are bf16 (on an NVIDIA GPU of compute
    capability 8.0 or newer), the (T, N, D) backward then sums dB and dC over the channels as packed bf16 pairs (half
    the shuffles), rounding each term and each partial sum to bf16. Off by default, like TF32 matmuls.

    Measured on an H200 (benchmarks/NOTES-scan.md v13) against the fp32 shuffle sums, the default then: the N = 16
    backward kernel took 17-23 % less time (Vim-Ti layer 0.945 → 0.783 ms; the fixed-point sums of
    :func:`set_fixed_channel_sums`, the default now, take 0.87 ms), vim_tiny graph-mode training 2,766 → 3,018 img/s.
    The price: on the Vim-Ti layer dB's and dC's relative error against an fp64 reference rose from 1.7e-3 to 4.5e-3
    (norm), and element-wise they exceed mamba-ssm's bf16 tolerance by up to 4.5× at N = 16 (`kernels.check_gpu`: 7 of
    the 7 bf16 N = 16 cases fail on dB or dC, where mamba-ssm's own error is 4-32× smaller). Other gradients and other
    dtypes are unchanged.
    """
    global _PACKED_SUMS
    if not isinstance(enabled, bool):
        raise TypeError(f"set_packed_channel_sums: expected True or False, got {enabled!r}")
    _PACKED_SUMS = enabled


def packed_channel_sums(B: torch.Tensor, C: torch.Tensor, lane_sums: bool) -> bool:
    """Whether a backward call takes the packed bf16 channel sums (see :func:`set_packed_channel_sums`)."""
    return (
        _PACKED_SUMS
        and B.dtype == torch.bfloat16
        and C.dtype == torch.bfloat16
        and not lane_sums
        and _nvidia_sm80(B.device)
    )


_FIXED_SUMS = True


def set_fixed_channel_sums(enabled: bool) -> None:
    """Switch the backward's fixed-point channel sums of dB and dC (on by default) off, or on again.

    They apply where B and C are bf16 or fp16 and the (T, N, D) backward runs one warp of 32 channels with 32
    (step, state) rows per state group (8 steps x 4 states in the default configs, so every N >= 3; measured on a GPU
    for N = 16), on a GPU of compute capability 8.0 or newer: each term is scaled by the tile's power of two and
    rounded to 2^-21 of the tile's largest (to 2^-126 when that is below 2^-104), and each row is summed exactly by one
    ``redux.sync`` (66 per group and chunk, in place of 320 shuffles). So a sum's error is bounded relative to the
    tile's largest term, not to the sum itself (a row far smaller than its tile's largest keeps few bits), and a
    tile whose largest term is within a unit of FLT_MAX sums to inf. Measured on an H200 (benchmarks/NOTES-scan.md
    v14): the backward kernel took 4-16 % less time (Vim-Ti layer 0.94 → 0.87 ms), vim_tiny graph-mode training
    +3.6 %; dB's and dC's error against an fp64 reference, in norm, is that of the fp32 shuffle sums (the bf16 rounding
    of the outputs dominates both). fp32 B and C keep the shuffle sums. The opt-in packed bf16 sums
    (:func:`set_packed_channel_sums`) take precedence.
    """
    global _FIXED_SUMS
    if not isinstance(enabled, bool):
        raise TypeError(f"set_fixed_channel_sums: expected True or False, got {enabled!r}")
    _FIXED_SUMS = enabled


CHANNEL_SUMS = ("fixed", "butterfly", "packed")


def set_channel_sums(mode: str) -> None:
    """One switch for the backward's channel sums of dB and dC: ``fixed`` (the fixed-point sums, the default),
    ``butterfly`` (fp32 shuffles) or ``packed`` (the opt-in bf16 pairs). See :func:`set_fixed_channel_sums` and
    :func:`set_packed_channel_sums`; process-wide, like them."""
    if mode not in CHANNEL_SUMS:
        raise ValueError(f"channel sums {mode!r} are not known; use one of {', '.join(CHANNEL_SUMS)}")
    set_fixed_channel_sums(mode == "fixed")
    set_packed_channel_sums(mode == "packed")


def channel_sums() -> str:
    """The current setting of :func:`set_channel_sums` (``packed`` when opted into, whatever the fixed switch)."""
    return "packed" if _PACKED_SUMS else "fixed" if _FIXED_SUMS else "butterfly"


_HALF = (torch.bfloat16, torch.float16)


def fixed_channel_sums(
    block_t: int, block_d: int, warps: int, group: int, B: torch.Tensor, C: torch.Tensor, packed: bool = False
) -> bool:
    """Whether a (T, N, D) backward call takes the fixed-point channel sums (see :func:`set_fixed_channel_sums`)."""
    return (
        _FIXED_SUMS
        and not packed
        and B.dtype in _HALF
        and C.dtype in _HALF
        and warps == 1
        and block_d == 32
        and block_t * group == 32
        and _nvidia_sm80(B.device)
    )


@functools.cache
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _nvidia_sm80(device: torch.device) -> bool:
    """Whether the compiled kernels may use PTX of sm_80 and later (redux.sync, bf16x2) on ``device``: an NVIDIA GPU
    of compute capability 8.0 or newer, not a ROCm one (whose devices torch also calls ``cuda``). True off the GPU,
    where the interpreter runs the emulations."""
    if device.type != "cuda":
        return True
    if torch.version.hip is not None:
        return False
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())[0] >= 8


def lane_sum(block_t: int, block_d: int, warps: int, group: int) -> bool:
    """Whether the (T, N, D) backward sums dB and dC across channels as a partial reduce-scatter (``LANE_SUM``).

    Only where it was measured faster: one state per group (N = 1), one warp, one channel per lane, and fewer steps
    per chunk than lanes (VMamba-T stage 1 backward 1.26 → 1.19 ms on an H200). With 32 (step, state) rows per
    group (N = 16) the full reduce-scatter made the backward 1.84x slower (benchmarks/NOTES-scan.md v7)."""
    return warps == 1 and group == 1 and block_t < block_d <= 32


def _needs_int64(seqlen: int, k: int, dim: int, n: int, *tensors: torch.Tensor | None) -> bool:
    """Whether the kernels need int64 offsets: a row offset inside one (batch, order) slice (the largest token stride
    times L plus the largest span of the last axis, channels or states at B/C's own stride) or an order's offset
    (K - 1 times the largest order stride: B·L·D for an order-major tensor), over every gathered or written tensor
    (the per-order outputs have the token stride K·D and the dB/dC partials K·N)."""
    token, last, order = k * max(dim, n), max(dim, n), 0
    for t in tensors:
        if t is not None and t.dim() == 4:
            st = t.stride()
            token, last, order = max(token, abs(st[1])), max(last, t.shape[3] * abs(st[3])), max(order, abs(st[2]))
    return max(seqlen * token + last, (k - 1) * order) >= 2**31


@triton.jit
def _sum_orders_kernel(
    x_ptr, out_ptr, rows, K, DIM, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr
):
    # out[r, d] = Σ_k x[r, k, d] in fp32, rounded once to out's dtype; x is (rows, K, D) contiguous.
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_rd = (offs_r < rows)[:, None] & (offs_d < DIM)[None, :]
    m = m_rd[:, None, :] & (offs_k < K)[None, :, None]
    off = (offs_r.to(tl.int64)[:, None, None] * K + offs_k[None, :, None]) * DIM + offs_d[None, None, :]
    acc = tl.sum(tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32), axis=1)
    out_off = offs_r.to(tl.int64)[:, None] * DIM + offs_d[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=m_rd)


def _sum_orders(x: torch.Tensor) -> torch.Tensor:
    """(B, L, K, D) per-order gradients of a shared input → (B, L, 1, D), summed in fp32 and rounded once.

    One pass at copy bandwidth; torch's sum over the strided K axis took twice the bytes' time on an H200, plus a
    separate cast when accumulating in fp32."""
    bsz, seqlen, k, dim = x.shape
    x = x.contiguous()
    out = torch.empty(bsz, seqlen, 1, dim, device=x.device, dtype=x.dtype)
    rows = bsz * seqlen
    block_d = min(next_pow2(dim), 128)
    block_k = next_pow2(k)
    block_r = max(1, 4096 // (block_d * block_k)) if x.device.type == "cuda" else 4
    grid = (cdiv(rows, block_r), cdiv(dim, block_d))
    _sum_orders_kernel[grid](x, out, rows, k, dim, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4)
    return out


def _strides(t: torch.Tensor, ndim_k: int) -> tuple[int, int, int]:
    """(batch, token, order) strides; the order stride is 0 for a size-1 order axis (shared across K)."""
    st = t.stride()
    return st[0], st[1], 0 if t.shape[2] == 1 and ndim_k > 1 else st[2]


def _last_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


def scan_fwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    orders: torch.Tensor | None,
    out_dtype: torch.dtype | None,
    save_states: bool,
    config: tuple[int, ...] | None = None,
    store_y: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args: as :func:`selective_scan_triton`; ``save_states`` keeps the chunk-start states for the backward;
    ``store_y=False`` (with ``save_states``: the backward's recompute) computes and writes only the states.

    Returns:
        y (B, L, K, D) in ``out_dtype`` (empty without ``store_y``), and the chunk-start states (B·K, n_chunks, D, N)
        fp32 (empty when not saved).
    """
    u, delta, z = _last_contiguous(u), _last_contiguous(delta), _last_contiguous(z)
    bsz, seqlen, k, dim = delta.shape
    n = A.shape[2]
    A = A.contiguous()
    config = tuple(config or scan_config(dim, n, seqlen, u.device))
    save_t = config[0]
    n_save = cdiv(seqlen, save_t)
    if not (store_y or save_states):
        raise ValueError("scan_fwd: store_y=False needs save_states=True (there would be nothing to compute)")
    y = torch.empty((bsz, seqlen, k, dim) if store_y else (0,), device=u.device, dtype=out_dtype or u.dtype)
    if save_states:
        states = torch.empty(bsz * k, n_save, dim, n, device=u.device, dtype=torch.float32)
    else:
        states = torch.empty(0, device=u.device, dtype=torch.float32)
    orders_i = orders.to(device=u.device, dtype=torch.int32).contiguous() if orders is not None else None
    dummy = A
    zs = _strides(z, k) if z is not None else (0, 0, 0)
    common = dict(  # without y, z is not read at all
        HAS_D=D is not None, HAS_Z=z is not None and store_y, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), HAS_ORDERS=orders_i is not None, SAVE_STATES=save_states, STORE_Y=store_y,
    )  # fmt: skip
    args = (
        u, delta, A, B, C,
        D.contiguous() if D is not None else dummy, z if z is not None else dummy,
        delta_bias.contiguous() if delta_bias is not None else dummy,
        orders_i if orders_i is not None else dummy, y, states,
    )  # fmt: skip
    strides = (
        *_strides(u, k), *_strides(delta, k), *_strides(B, k), B.stride(3), *_strides(C, k), C.stride(3),
        *zs, *(_strides(y, k) if store_y else (0, 0, 0)),
    )  # fmt: skip
    if len(config) == 3:
        bt, bd, warps = config
        _scan_fwd_kernel[(cdiv(dim, bd), bsz * k)](
            *args, seqlen, k, dim, n, n_save, *strides,
            BLOCK_T=bt, BLOCK_D=bd, BLOCK_N=next_pow2(n), num_warps=warps, **common,
        )  # fmt: skip
    else:
        from .triton_scan_nd import _scan_fwd_nd_kernel

        bt, bd, warps = config[3:6]
        if save_t % bt and bt % save_t:
            raise ValueError(
                f"config: the forward chunk {bt} and the saved-state interval {save_t} must divide one another"
            )
        n_chunks = cdiv(seqlen, bt)
        n_dblocks = cdiv(dim, bd)
        n_seg, seg_chunks = _fwd_segments(config, n_chunks, n_dblocks * bsz * k, u.device)
        idx64 = _needs_int64(seqlen, k, dim, n, u, delta, B, C, z, y)
        shape = dict(BLOCK_T=bt, BLOCK_D=bd, BLOCK_N=next_pow2(n), SAVE_T=save_t, num_warps=warps, IDX64=idx64)
        segx = segdt = dummy
        if n_seg > 1:  # first pass: each earlier segment's end state from a zero start, and its ΣΔ
            segx = torch.empty((n_seg - 1) * bsz * k, dim, n, device=u.device, dtype=torch.float32)
            segdt = torch.empty((n_seg - 1) * bsz * k, dim, device=u.device, dtype=torch.float32)
            first = {**common, "HAS_Z": False, "SAVE_STATES": False, "STORE_Y": False}
            _scan_fwd_nd_kernel[(n_dblocks, bsz * k, n_seg - 1)](
                *args[:-2], dummy, dummy, segx, segdt, seqlen, k, dim, n, n_chunks, n_save, bsz, seg_chunks,
                *strides, SPLIT=True, CARRY_OUT=True, **shape, **first,
            )  # fmt: skip
        _scan_fwd_nd_kernel[(n_dblocks, bsz * k, n_seg)](
            *args, segx, segdt, seqlen, k, dim, n, n_chunks, n_save, bsz, seg_chunks, *strides, SPLIT=n_seg > 1,
            **shape, **common,
        )  # fmt: skip
    return y, states


def scan_bwd(
    dy: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    orders: torch.Tensor | None,
    states: torch.Tensor,
    config: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Launch the backward kernel and reduce its partials.

    Args:
        dy: (B, L, K, D) gradient of the output. ``states``: from :func:`scan_fwd` with ``save_states=True``.
        Others: as :func:`selective_scan_triton` (the same ``config`` as the forward).

    Returns:
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, shaped and typed like their inputs (None for absent inputs).
    """
    u, delta, z, dy = _last_contiguous(u), _last_contiguous(delta), _last_contiguous(z), _last_contiguous(dy)
    bsz, seqlen, k, dim = delta.shape
    n = A.shape[2]
    A = A.contiguous()
    config = tuple(config or scan_config(dim, n, seqlen, u.device))
    bt, bd, warps = config[:3]
    n_chunks = cdiv(seqlen, bt)
    n_dblocks = cdiv(dim, bd)
    dev = u.device
    f32 = torch.float32
    # Per-order gradients in the input's dtype, also for a u or z shared by the K orders: each order's term is rounded
    # once, as mamba-ssm's per-order du is, and the sum over K below accumulates in fp32. (fp32 terms would double
    # the largest write and the sum's read, 1.2 GB on VMamba-T stage 1.)
    du = torch.empty(bsz, seqlen, k, dim, device=dev, dtype=u.dtype)
    ddelta = torch.empty(bsz, seqlen, k, dim, device=dev, dtype=delta.dtype)
    dz = None
    if z is not None:
        dz = torch.empty(bsz, seqlen, k, dim, device=dev, dtype=z.dtype)
    # dB's and dC's per-channel-block partials in one buffer: one sum for both.
    dBC_part = torch.empty(2, n_dblocks, bsz, seqlen, k, n, device=dev, dtype=f32)
    dB_part, dC_part = dBC_part[0], dBC_part[1]
    one_decay = len(config) > 8 and bool(config[8])
    n_seg, seg_chunks = _segments(config, n_chunks, n_dblocks * bsz * k, dev) if one_decay else (1, n_chunks)
    # The second kernel layout accumulates dA in place across chunks through this buffer, so it starts from zeros,
    # unless the states form a single group (then dA stays in registers and each program writes its slice once).
    # Per-program partials have one slot per segment of L.
    one_group = len(config) > 3 and config[6] >= next_pow2(n)
    alloc = torch.empty if len(config) == 3 or one_group else torch.zeros
    dA_part = alloc(n_seg * bsz, k, dim, n, device=dev, dtype=f32)
    dD_part = torch.empty(n_seg * bsz, k, dim, device=dev, dtype=f32) if D is not None else None
    dbias_part = torch.empty(n_seg * bsz, k, dim, device=dev, dtype=f32) if delta_bias is not None else None
    orders_i = orders.to(device=dev, dtype=torch.int32).contiguous() if orders is not None else None
    dummy = A
    zs = _strides(z, k) if z is not None else (0, 0, 0)
    inputs = (
        u, delta, A, B, C,
        D.contiguous() if D is not None else dummy, z if z is not None else dummy,
        delta_bias.contiguous() if delta_bias is not None else dummy,
        orders_i if orders_i is not None else dummy, dy, states,
    )  # fmt: skip
    outputs = (
        du, ddelta, dz if dz is not None else dummy, dB_part, dC_part, dA_part,
        dD_part if dD_part is not None else dummy, dbias_part if dbias_part is not None else dummy,
    )  # fmt: skip
    strides = (
        *_strides(u, k), *_strides(delta, k), *_strides(B, k), B.stride(3), *_strides(C, k), C.stride(3),
        *zs, *_strides(dy, k),
    )  # fmt: skip
    common = dict(
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        HAS_ORDERS=orders_i is not None, BLOCK_T=bt, BLOCK_D=bd, BLOCK_N=next_pow2(n), num_warps=warps,
    )  # fmt: skip
    if len(config) == 3:
        grid = (n_dblocks, bsz * k)
        _scan_bwd_kernel[grid](*inputs, *outputs, seqlen, k, dim, n, n_chunks, bsz, *strides, **common)
    else:
        from .triton_scan_nd import _scan_bwd_carry_kernel, _scan_bwd_nd_kernel

        # the adjoint carry, per (segment, batch, order)
        # (the one-decay kernel writes each program's starting carry itself; the two-decay one starts from zeros)
        hbuf = (
            dummy
            if one_group
            else (torch.empty if one_decay else torch.zeros)(n_seg * bsz * k, dim, n, device=dev, dtype=f32)
        )
        group = min(config[6], next_pow2(n))
        prefetch = bool(config[7]) if len(config) > 7 else False
        idx64 = _needs_int64(seqlen, k, dim, n, u, delta, B, C, z, dy)
        segc = segdt = dummy
        if n_seg > 1:  # first pass: each later segment's carry-out with a zero carry-in, and its ΣΔ
            segc = torch.empty(n_seg * bsz * k, dim, n, device=dev, dtype=f32)
            segdt = torch.empty(n_seg * bsz * k, dim, device=dev, dtype=f32)
            _scan_bwd_carry_kernel[(n_dblocks, bsz * k, n_seg - 1)](
                delta, A, C, z if z is not None else dummy, inputs[7], inputs[8], dy, segc, segdt,
                seqlen, k, dim, n, n_chunks, bsz, seg_chunks,
                *_strides(delta, k), *_strides(C, k), C.stride(3), *zs, *_strides(dy, k),
                BLOCK_T=bt, BLOCK_D=bd, BLOCK_N=next_pow2(n), GROUP_N=group, HAS_Z=z is not None,
                HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), HAS_ORDERS=orders_i is not None,
                IDX64=idx64, num_warps=warps,
            )  # fmt: skip
        cap = {"maxnreg": config[10]} if len(config) > 10 and config[10] > 0 else {}
        lsum = lane_sum(bt, bd, warps, group)
        packed = packed_channel_sums(B, C, lsum)
        fixed = fixed_channel_sums(bt, bd, warps, group, B, C, packed)
        _scan_bwd_nd_kernel[(n_dblocks, bsz * k, n_seg)](
            *inputs, hbuf, *outputs, segc, segdt, seqlen, k, dim, n, n_chunks, bsz, n_seg, seg_chunks, *strides,
            GROUP_N=group, PREFETCH=prefetch, ONE_DECAY=one_decay, IDX64=idx64,
            LANE_SUM=lsum, PACK_BC=packed, FIXED_SUM=fixed, **cap, **common,
        )  # fmt: skip
    if u.shape[2] != k:
        du = _sum_orders(du)
    if z is not None and z.shape[2] != k:
        dz = _sum_orders(dz)
    dBC = dBC_part[:, 0] if n_dblocks == 1 else dBC_part.sum(1)
    # Separate tensors (a registered op's outputs may not alias each other): the casts copy, and so does fp32.
    dB, dC = dBC[0].to(B.dtype, copy=True), dBC[1].to(C.dtype, copy=True)
    dA = dA_part.sum(0)
    dD = dD_part.sum(0) if dD_part is not None else None
    dbias = dbias_part.sum(0) if dbias_part is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, dbias


class SelectiveScanTriton(torch.autograd.Function):
    """Autograd wrapper: saves the inputs and the chunk-start states, recomputes everything else."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, orders, out_dtype):
        # forward() runs with grad mode off; needs_input_grad says whether a backward can follow.
        save = any(ctx.needs_input_grad[:8])
        y, states = scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, orders, out_dtype, save)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, orders, states)
        ctx.delta_softplus = delta_softplus
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, D, z, delta_bias, orders, states = ctx.saved_tensors
        grads = scan_bwd(dy, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, orders, states)
        du, ddelta, dA, dB, dC, dD, dz, dbias = grads
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None, None


def selective_scan_triton(
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
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Fused K-order selective scan (Triton), differentiable in every tensor argument.

    Same semantics and signature as :func:`kernels.reference.selective_scan_ref`; inputs are assumed validated.

    Args:
        u: (B, L, Ku, D), Ku in {1, K}. delta: (B, L, K, D). A: (K, D, N) fp32. B, C: (B, L, K, N).
        D: (K, D) fp32 or None. z: (B, L, Kz, D) or None. delta_bias: (K, D) fp32 or None.
        delta_softplus: softplus(delta + delta_bias). orders: (K, L) permutations or None (identity).
        out_dtype: output dtype (default ``u.dtype``).

    Returns:
        y: (B, L, K, D) in original token order.
    """
    return SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, orders, out_dtype)
