"""The multi-order Mamba mixer: one block class for supernets, derived children and fixed-order baselines.

A mixer scans its input along K token orders at once. The input and output projections are shared by every order;
the order-dependent parameters (``x_proj``, ``dt_proj``, ``A_log``, ``D`` and, in the plain family, the causal
``conv1d``) are stacked on a leading K axis, and all K orders go through ONE ``kernels.selective_scan`` call (and one
``kernels.causal_conv1d`` call). The state-dict keys do not depend on K, so a child's per-order tensors are rows of its
supernet's (see :func:`slice_mixer_state`).

Merge rule (the same function in search and in derived models): the branch outputs are combined as a convex
combination ``y = Σ_k w_k · y_k`` with ``Σ_k w_k = 1``:

* supernet, ``softmax`` mode: ``w = softmax(arch_logits)`` (DARTS);
* supernet, ``gumbel`` mode: ``w = softmax((arch_logits + g) / tau)`` with Gumbel noise ``g`` (training only);
* supernet, ``hard`` mode: ``top_m`` orders sampled by Gumbel top-m; only those are computed, each weighted ``1/m``
  in the forward pass with the straight-through gradient of the Gumbel-softmax (GDAS); in eval mode the ``top_m``
  orders derivation keeps (:func:`search_spaces.select_top_k`: the most probable, the space's ``min_global`` global
  ones reserved, ties toward the earlier candidate), so a derived child computes what it computes;
* derived child or baseline with k orders: ``w = 1/k`` (Vim averages its two branches the same way).

With a z gate (Mamba's ``y ⊙ silu(z)``, z shared by the K orders) and the plain merge, the gate is applied once, after
the merge: ``silu(z) ⊙ Σ_k w_k · y_k`` equals ``Σ_k w_k · (y_k ⊙ silu(z))``, and the scan then runs without z. With the
branch attention, which pools each order's LayerNorm'd output, every order is gated in the scan.

So a child evaluated with ``hard`` weights of its own orders computes exactly what the supernet computes in ``hard``
mode with those orders sampled. LocalMamba instead layer-normalised the branches in the supernet and summed them in
the child; that mismatch is what this rule removes.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.ref_ops import flop_counting
from search_spaces import coinciding_orders, is_global_order, scan_order

__all__ = [
    "ARCH_MODES",
    "Branch",
    "BranchAttn",
    "LayerNorm",
    "MultiOrderMixer",
    "batched_branch_weights",
    "build_orders",
    "slice_mixer_state",
]

ARCH_MODES = ("softmax", "gumbel", "hard")

# A layer's merge weights and the indices of the orders it computes (None: every order), see branch_weights.
Branch = tuple[torch.Tensor, torch.Tensor | None]


def build_orders(names: Sequence[str], grid: tuple[int, int], extra_token_step: int | None = None) -> torch.Tensor:
    """Stack the named orders of an ``H×W`` grid into a (K, L) LongTensor, optionally visiting one extra token.

    Args:
        names: K order names (see :mod:`search_spaces.orders`).
        grid: (H, W) token grid.
        extra_token_step: if set, the token stored after the grid (index ``H*W``, e.g. a class token) is visited at
            this scan step in every order, which shifts the later grid tokens by one step (Vim's middle class token).

    Returns:
        (K, L) with ``L = H*W`` (+1 with an extra token).
    """
    height, width = grid
    rows = [scan_order(n, height, width) for n in names]
    if extra_token_step is not None:
        extra = torch.tensor([height * width], dtype=torch.long)
        rows = [torch.cat([r[:extra_token_step], extra, r[extra_token_step:]]) for r in rows]
    return torch.stack(rows)


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _fp32_or_wider(t: torch.Tensor) -> torch.Tensor:
    """The scan's fp32 parameters (A, D, Δ bias) of a model in any dtype; an fp64 model keeps fp64 (the reference
    scan then runs in fp64, e.g. for ``torch.autograd.gradcheck``)."""
    return t.to(kernels.reference.compute_dtype(t))


def _gemm_dtype(u: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype the projections' GEMMs run in: what autocast would give a bmm (its dtype when it is on for u's device
    and the operands are fp32/fp16/bf16; fp64 is left alone), else the promoted one."""
    dev = u.device.type
    eligible = u.dtype in _AUTOCAST_ELIGIBLE and w.dtype in _AUTOCAST_ELIGIBLE
    if eligible and torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(u.dtype, w.dtype)


def _x_proj(u: torch.Tensor, x_w: torch.Tensor, token_major: bool = False, split: bool = False) -> torch.Tensor:
    """(B, L, Ku, D) × (K, C, D) → (K, B·L, C): every order's x_proj (one GEMM when the K orders share u).

    ``token_major`` (the one-node path, operands of one dtype, no autograd): the result is a view of a (B·L, K, C)
    buffer, as it always is with a shared u, so that the backward can split the tokens for its weight gradients.
    ``split`` (the plain-ops path): the GEMM is :class:`_SplitGradBmm` (weight gradient by :func:`_weight_grad`)."""
    bsz, seqlen, ku, d = u.shape
    k, c, _ = x_w.shape
    rows = bsz * seqlen
    if ku == 1 and split:
        return _SplitGradBmm.apply(u.reshape(1, rows, d), x_w.reshape(1, k * c, d)).view(rows, k, c).transpose(0, 1)
    if ku == 1:
        return (u.reshape(rows, d) @ x_w.reshape(k * c, d).t()).view(rows, k, c).transpose(0, 1)
    a, b = u.reshape(rows, k, d).transpose(0, 1), x_w.transpose(1, 2)
    if split:
        return _SplitGradBmm.apply(a, x_w)
    if not token_major:
        return torch.bmm(a, b)
    return torch.bmm(a, b, out=u.new_empty(rows, k, c).transpose(0, 1))


# torch.bmm(..., out_dtype=torch.float32) of fp16/bf16 operands on CUDA (torch >= 2.8).
_BMM_OUT_DTYPE = "dtype" in torch.ops.aten.bmm.overloads()


def _row_splits(rows: int, groups: int) -> int:
    """How many interleaved token slices :func:`_weight_grad` sums: about 64 GEMM batches in all, at most 16 slices,
    a divisor of ``rows`` (1: no split)."""
    s = min(16, max(1, 64 // groups))
    while rows % s:
        s //= 2
    return s


def _split_tokens(t: torch.Tensor, s: int) -> torch.Tensor:
    """(rows, G, C) → (s·G, rows/s, C), batch i·G + g holding rows i, i + s, i + 2s, … of group g: a view whenever
    the G and C axes are one strided block per row (a copy otherwise)."""
    rows, g, c = t.shape
    return t.reshape(rows // s, s, g, c).permute(1, 2, 0, 3).reshape(s * g, rows // s, c)


def _weight_grad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_r a[r, g]ᵀ b[r, g] for every group g: (rows, G, P) × (rows, G, Q) → (G, P, Q), accumulated in fp32 (fp64 for
    fp64 operands).

    These are the projections' weight gradients, GEMMs with a long reduction over the B·L tokens and a small output
    (Vim-Ti's x_proj: 2 × 48 × 384): as one batched GEMM they ran on a few dozen thread blocks, 41 µs where reading
    the operands takes 13 (H200). Split into interleaved token slices, ~64 GEMM batches fill the GPU; the fp32
    partials are then summed (benchmarks/projections_h200/dw_split.json)."""
    rows, g = a.shape[:2]
    s = _row_splits(rows, g)
    pa, pb = _split_tokens(a, s).transpose(1, 2), _split_tokens(b, s)
    if a.dtype not in (torch.float16, torch.bfloat16):
        part = torch.bmm(pa, pb)
    elif a.is_cuda and _BMM_OUT_DTYPE:
        part = torch.bmm(pa, pb, out_dtype=torch.float32)
    else:  # the same fp32 accumulation from fp32 copies of the operands
        part = torch.bmm(pa.float(), pb.float())
    return part.view(s, g, *part.shape[1:]).sum(0)


def order_projections(
    u: torch.Tensor, x_w: torch.Tensor, dt_w: torch.Tensor, d_state: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every order's ``x_proj`` and ``dt_proj``: ``(delta, B, C)``, each (B, L, K, ·), views of (K, B·L, ·) GEMMs.

    Args:
        u: (B, L, Ku, D) scan input, Ku in {1, K}.
        x_w: (K, R' + 2N + pad, D) padded x_proj weights, laid out [Δ rank | B | C | pad].
        dt_w: (K, D, R') padded dt_proj weights.
        d_state: N.

    In plain eager mode this is one autograd node whose backward writes u's gradient straight into u's own
    (B, L, K, D) layout: through autograd's GEMM backward it came out order-major, and summing it with the scan's
    contiguous gradient was a strided add (1.6 ms of vim_tiny's 48 ms graph-mode step on an H200). Under
    torch.compile, dispatch modes (``FlopCounterMode``) and ``torch.func`` transforms the same math runs as plain ops
    (:func:`_order_projections_ops`).
    """
    # the kernels' own rule for running an autograd.Function directly, plus torch.func, which cannot trace this one
    if not kernels.library.direct_eager() or torch._C._are_functorch_transforms_active():
        return _order_projections_ops(u, x_w, dt_w, d_state)
    return _OrderProjections.apply(u, x_w, dt_w, d_state)


def _project(u, x_w, dt_w, d_state, token_major=False, split=False):
    # (K, B·L, ·) GEMM outputs: dt (the Δ-rank columns of x_proj's), delta, B, C (views of x_proj's output).
    x_dbl = _x_proj(u, x_w, token_major, split)
    rank_p = dt_w.shape[-1]
    # split, not slices: its backward is one cat, where each slice's is a zero-filled copy summed with the others
    dt, b, c, _ = x_dbl.split([rank_p, d_state, d_state, x_dbl.shape[-1] - rank_p - 2 * d_state], dim=-1)
    delta = _SplitGradBmm.apply(dt, dt_w) if split else torch.bmm(dt, dt_w.transpose(1, 2))
    return dt, delta, b, c


class _SplitGradBmm(torch.autograd.Function):
    """``a @ wᵀ`` per group, (G, rows, P) × (G, Q, P) → (G, rows, Q), whose weight gradient is :func:`_weight_grad`
    (token slices, fp32 partials) instead of autograd's one small-output GEMM. The projections' plain-ops path, which
    torch.compile traces (forward and backward), runs its GEMMs through it. The GEMM runs in the dtype autocast gives
    it (read from its result), and so does the backward's."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.bmm(a, w.transpose(1, 2))
        ctx.save_for_backward(a.to(out.dtype), w.to(out.dtype))
        ctx.dtypes = (a.dtype, w.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, w = ctx.saved_tensors
        grad = grad.to(a.dtype)
        da = dw = None
        if ctx.needs_input_grad[0]:
            da = torch.bmm(grad, w).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:  # (rows, G, Q)ᵀ × (rows, G, P) summed over the rows
            dw = _weight_grad(grad.transpose(0, 1), a.transpose(0, 1)).to(ctx.dtypes[1])
        return da, dw


def _order_major(t: torch.Tensor, bsz: int, seqlen: int) -> torch.Tensor:
    return t.unflatten(1, (bsz, seqlen)).permute(1, 2, 0, 3)  # (K, B·L, ·) → (B, L, K, ·) view


def _order_projections_ops(u, x_w, dt_w, d_state):
    # torch.func's transforms cannot run an autograd.Function without a vmap rule: plain GEMMs there.
    split = not torch._C._are_functorch_transforms_active()
    _, delta, b, c = _project(u, x_w, dt_w, d_state, split=split)
    return tuple(_order_major(t, *u.shape[:2]) for t in (delta, b, c))


class _OrderProjections(torch.autograd.Function):
    """:func:`order_projections` as one node; the GEMMs run in :func:`_gemm_dtype` (autocast's under autocast)."""

    @staticmethod
    def forward(ctx, u, x_w, dt_w, d_state):
        dtype = _gemm_dtype(u, x_w)
        # Every operand already in the GEMMs' dtype: autocast, if on, has nothing left to cast. u contiguous: the GEMMs
        # read it as a (B·L, ·) view, forward and backward, without a copy each time (the VMamba path's is strided).
        uc, x_wc, dt_wc = u.to(dtype).contiguous(), x_w.to(dtype), dt_w.to(dtype)
        dt, delta, b, c = _project(uc, x_wc, dt_wc, d_state, token_major=True)
        ctx.save_for_backward(uc, x_wc, dt_wc, dt)
        ctx.d_state, ctx.dtypes = d_state, (u.dtype, x_w.dtype, dt_w.dtype)
        ctx.set_materialize_grads(False)
        return tuple(_order_major(t, *u.shape[:2]) for t in (delta, b, c))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, ddelta, db, dc):
        uc, x_wc, dt_wc, dt = ctx.saved_tensors
        need_u, need_xw, need_dtw = ctx.needs_input_grad[:3]
        bsz, seqlen, ku, dim = uc.shape
        k, width, _ = x_wc.shape
        rows, n, rank_p = bsz * seqlen, ctx.d_state, dt_wc.shape[-1]
        # gradient of x_proj's output, [Δ rank | B | C | pad], token-major (rows, K, ·) like the forward's
        dx_r = uc.new_empty(rows, k, width)
        dx = dx_r.transpose(0, 1)
        dx_r[..., rank_p + 2 * n :].zero_()
        if ddelta is None:
            dx_r[..., :rank_p].zero_()
        else:
            dd_r = ddelta.to(uc.dtype).reshape(rows, k, dim)
            torch.bmm(dd_r.transpose(0, 1), dt_wc, out=dx[..., :rank_p])
        for i, g in enumerate((db, dc)):
            part = dx_r[..., rank_p + i * n : rank_p + (i + 1) * n]
            if g is None:
                part.zero_()
            else:
                part.copy_(g.reshape(rows, k, n))
        du = dx_w = ddt_w = None
        if need_u and ku == 1:
            du = (dx_r.view(rows, k * width) @ x_wc.reshape(k * width, dim)).view(bsz, seqlen, 1, dim)
        elif need_u:  # written in u's own (B, L, K, D) layout
            du = uc.new_empty(bsz, seqlen, k, dim)
            torch.bmm(dx, x_wc, out=du.view(rows, k, dim).transpose(0, 1))
        if need_xw:
            if ku == 1:  # one u for every order: one group of K·C columns
                dx_w = _weight_grad(dx_r.view(rows, 1, k * width), uc.view(rows, 1, dim)).view(k, width, dim)
            else:
                dx_w = _weight_grad(dx_r, uc.view(rows, k, dim))
            dx_w = dx_w.to(ctx.dtypes[1])
        if need_dtw and ddelta is not None:
            ddt_w = _weight_grad(dd_r, dt.transpose(0, 1)).to(ctx.dtypes[2])
        return None if du is None else du.to(ctx.dtypes[0]), dx_w, ddt_w, None


def _autocast_on(device_type: str) -> bool:
    # (torch.amp.is_autocast_available breaks the graph under torch 2.11's Dynamo: callers check for compiling first)
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def gemm_input_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a GEMM reading x will cast it to under autocast (None without autocast, and under torch.compile,
    whose own fusion takes the cast): what a norm feeding a GEMM writes to save that cast."""
    if torch.compiler.is_compiling() or x.dtype not in _AUTOCAST_ELIGIBLE:  # autocast leaves fp64 alone
        return None
    return torch.get_autocast_dtype(x.device.type) if _autocast_on(x.device.type) else None


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension through ``kernels.layer_norm`` (its Triton kernels on CUDA with
    ``backend`` auto/triton). Same parameters and state dict as ``nn.LayerNorm``.

    ``forward(x, out_dtype)``: the result's dtype, by default what ``nn.LayerNorm`` returns (fp32 under CUDA's autocast,
    x's dtype without autocast; under another device's autocast the call is PyTorch's); a norm whose output only feeds
    a GEMM passes :func:`gemm_input_dtype` instead.
    """

    def __init__(self, dim: int, eps: float = 1e-5, backend: str = "auto") -> None:
        super().__init__(dim, eps=eps)
        self.backend = backend

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling():  # PyTorch's norm, which Inductor fuses; autocast sets its dtype
            y = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            return y if out_dtype is None else y.to(out_dtype)
        if out_dtype is None:
            out_dtype = x.dtype
            dev = x.device.type
            if _autocast_on(dev):
                if dev != "cuda":  # another device's autocast policy: PyTorch's norm applies it
                    return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
                if x.dtype in (torch.float16, torch.bfloat16, torch.float32):
                    out_dtype = torch.float32  # CUDA's autocast runs layer_norm in fp32
        return kernels.layer_norm(x, self.weight, self.bias, self.eps, out_dtype, backend=self.backend)


class BranchAttn(nn.Module):
    """Per-branch channel attention of LocalMamba's multi-order mixer (its ``BiAttn``, channel part), and the merge.

    Each order's output is gated by ``sigmoid(fc2(gelu(fc1(mean_L(LN(y_k))))))``, then the orders are summed with the
    merge weights; the module's weights are shared by every order, so it has no K axis and is used unchanged by a
    supernet and its children. The computation is :func:`kernels.branch_attn_merge` (fused on the ``triton`` backend).
    """

    def __init__(self, dim: int, ratio: float = 0.125) -> None:
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)  # followed by the exact (erf) GELU inside the merge op
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, y: torch.Tensor, w: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """y: (B, L, K, D), w: (K,) merge weights → (B, L, D)."""
        return kernels.branch_attn_merge(
            y, w, self.norm.weight, self.norm.bias, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
            eps=self.norm.eps, backend=backend,
        )  # fmt: skip


class MultiOrderMixer(nn.Module):
    """Mamba-1 mixer scanning K token orders in one call; supernet (``arch_logits``) or fixed orders.

    Args:
        dim: model width C.
        grid: (H, W) token grid the orders are built for.
        orders: the order names this mixer computes (a supernet's candidates, or a child's chosen k).
        search: own ``arch_logits`` (K,) and mix by ``mode``; otherwise weights are uniform ``1/K``.
        mode: ``softmax``, ``gumbel`` or ``hard`` (search only).
        min_global: global orders an eval-mode ``hard`` top-m keeps at least (the search space's; search only).
        d_state: SSM state size N.
        expand: inner width ``D = expand * dim``.
        dt_rank: rank of the Δ projection (``"auto"``: ``ceil(dim / 16)``).
        d_conv: width of the per-order causal conv1d (plain family; 0 disables it).
        conv_2d: kernel of a shared depthwise 2-D conv applied before the scan (hierarchical family; 0 disables it).
        conv_bias: bias for either conv.
        gate: multiply the scan output by ``silu(z)`` with ``z`` a second half of ``in_proj`` (Vim), or not (VMamba).
        out_norm: LayerNorm after the merge (VMamba).
        branch_attn: LocalMamba's per-branch channel attention before the merge.
        extra_token_step: scan step at which the extra token (index ``H*W``) is visited, if the input carries one.
        bias: bias of ``in_proj``/``out_proj``.
        scan_backend: ``kernels`` backend for the scan and the conv (``auto``: triton on CUDA, ref on CPU).
        scan_recompute: keep no chunk-start states between the scan's forward and backward (the Triton backward
            reruns the forward kernel): less memory for one more scan forward per step. ``None`` (what search models
            pass): only when the call scans every candidate (softmax/gumbel mixing, or ``hard`` with top-m = K), not
            for a sampled subset.
    """

    PER_ORDER = ("conv1d_weight", "conv1d_bias", "x_proj_weight", "dt_proj_weight", "dt_proj_bias", "A_log", "D")

    def __init__(
        self,
        dim: int,
        grid: tuple[int, int],
        orders: Sequence[str],
        search: bool = False,
        mode: str = "softmax",
        min_global: int = 0,
        d_state: int = 16,
        expand: float = 2.0,
        dt_rank: int | str = "auto",
        d_conv: int = 4,
        conv_2d: int = 0,
        conv_bias: bool = True,
        gate: bool = True,
        out_norm: bool = False,
        branch_attn: bool = False,
        extra_token_step: int | None = None,
        bias: bool = False,
        scan_backend: str = "auto",
        scan_recompute: bool | None = False,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        self.order_names = tuple(orders)
        k = len(self.order_names)
        self.grid = tuple(grid)
        self.d_inner = d_inner = int(expand * dim)
        self.d_state = d_state
        self.dt_rank = dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.gate = gate
        self.scan_backend = scan_backend
        if scan_recompute is not None and not isinstance(scan_recompute, bool):
            raise TypeError(f"scan_recompute: expected True, False or None, got {scan_recompute!r}")
        self.scan_recompute = scan_recompute
        self.search = search
        # The temperature as a device tensor too (the buffer ``_tau``), so a compiled step reads it as an input: as a
        # Python float changing every step (gdas) it was a graph input whose every value CUDA-graph trees could record
        # anew.
        self.tau = 1.0
        self.top_m = 1
        self.mode = "softmax"
        self.min_global = int(min_global)
        self.extra_token_step = extra_token_step
        kernels.resolve_backend(scan_backend, torch.device("cpu"))  # reject a bad backend name now, not mid-forward
        for name, value in self._computed_buffers(torch.device("cpu")).items():
            self.register_buffer(name, value, persistent=False)
        # A single token reads the same in every order: a fixed layer there (a hierarchical model's last stage on a
        # small image) is only redundant work, not worth a warning; a search layer there learns nothing.
        same = coinciding_orders(self.order_names, *self.grid) if search or self.grid[0] * self.grid[1] > 1 else []
        if same:
            what = "candidates" if search else "orders"
            warnings.warn(
                f"scan {what} coincide on the {self.grid[0]}x{self.grid[1]} token grid: "
                + ", ".join(f"{a} = {b}" for a, b in same)
                + (
                    "; the supernet splits probability between identical scans (use a larger image or a space "
                    "without them)"
                    if search
                    else "; this layer scans the same order more than once"
                ),
                stacklevel=2,
            )
        self.in_proj = nn.Linear(dim, d_inner * (2 if gate else 1), bias=bias)
        self.conv2d = (
            nn.Conv2d(d_inner, d_inner, conv_2d, padding=conv_2d // 2, groups=d_inner, bias=conv_bias)
            if conv_2d
            else None
        )
        if d_conv:
            bound = 1.0 / math.sqrt(d_conv)  # nn.Conv1d's default for a depthwise conv (fan_in = d_conv)
            self.conv1d_weight = nn.Parameter(torch.empty(k, d_inner, d_conv).uniform_(-bound, bound))
            self.conv1d_bias = nn.Parameter(torch.empty(k, d_inner).uniform_(-bound, bound)) if conv_bias else None
        else:
            self.conv1d_weight = self.conv1d_bias = None
        bound = 1.0 / math.sqrt(d_inner)  # nn.Linear's default
        self.x_proj_weight = nn.Parameter(torch.empty(k, dt_rank + 2 * d_state, d_inner).uniform_(-bound, bound))
        dt_std = dt_rank**-0.5
        self.dt_proj_weight = nn.Parameter(torch.empty(k, d_inner, dt_rank).uniform_(-dt_std, dt_std))
        # Δ bias such that softplus(bias) is log-uniform in [dt_min, dt_max] (Mamba's init).
        dt = torch.exp(torch.rand(k, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_proj_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        a = torch.arange(1, d_state + 1, dtype=torch.float32)
        self.A_log = nn.Parameter(torch.log(a).expand(k, d_inner, d_state).clone())
        self.D = nn.Parameter(torch.ones(k, d_inner))
        self.branch_attn = BranchAttn(d_inner) if branch_attn else None
        self.out_norm = LayerNorm(d_inner, backend=scan_backend) if out_norm else None
        self.out_proj = nn.Linear(d_inner, dim, bias=bias)
        if search:
            self.arch_logits = nn.Parameter(1e-3 * torch.randn(k))
            self.set_arch_mode(mode)
        else:
            self.arch_logits = None

    @property
    def num_orders(self) -> int:
        return len(self.order_names)

    def set_arch_mode(self, mode: str, tau: float = 1.0, top_m: int = 1) -> None:
        """Choose how a supernet mixer weights its orders (see the module docstring)."""
        if not self.search:
            raise RuntimeError("set_arch_mode: this mixer has fixed orders (no arch_logits)")
        if mode not in ARCH_MODES:
            raise ValueError(f"arch mode must be one of {', '.join(ARCH_MODES)}, got {mode!r}")
        if not tau > 0:
            raise ValueError(f"arch mode temperature tau must be > 0, got {tau!r}")
        if not isinstance(top_m, int) or not 1 <= top_m <= self.num_orders:
            raise ValueError(f"top_m must be an integer in 1..{self.num_orders}, got {top_m!r}")
        self.mode, self.tau, self.top_m = mode, float(tau), top_m
        with torch.no_grad():  # always: a dtype round trip of the module may have rounded the buffer
            self._tau.fill_(self.tau)

    def _computed_buffers(self, device: torch.device, tau_dtype: torch.dtype | None = None) -> dict:
        """The buffers computed from the constructor's arguments and kept out of the state dict (the temperature in
        ``tau_dtype``, default the default dtype, as the parameters are built)."""
        return {
            "_tau": torch.full((), self.tau, dtype=tau_dtype or torch.get_default_dtype(), device=device),
            "_is_global": torch.tensor([is_global_order(n) for n in self.order_names], dtype=torch.bool, device=device),
            # int32, the kernels' index type: an int64 buffer cost a conversion kernel in every scan and conv call.
            "orders": build_orders(self.order_names, self.grid, self.extra_token_step).to(device, torch.int32),
        }

    def init_non_persistent_buffers(self) -> None:
        """Compute the orders (and the other buffers outside the state dict) anew on the parameters' device. timm's
        ``reinit_non_persistent_buffers(model)`` (``timm.models._manipulate``) calls this on every module that has it:
        for a model built on ``meta`` whose weights were loaded with ``load_state_dict(..., assign=True)``.
        ``to_empty(device=...)`` needs no call: :meth:`_apply` writes them again."""
        with torch.no_grad():
            for name, value in self._computed_buffers(self.out_proj.weight.device, self._tau.dtype).items():
                setattr(self, name, value)

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply``, then, where ``fn`` handed out new uninitialised memory, the computed buffers written
        again in place (into the tensors ``fn`` made, so its device, dtype and sharing are kept): out of ``meta``, and
        from ``to_empty`` on a real model too, called on the mixer, on the model or through any wrapper (timm's
        ``features_only``), all of which reach this method. Moves and casts copy the values, and keep them (orders
        a user set included)."""
        was_meta = self.orders.is_meta
        super()._apply(fn, recurse)
        fresh = getattr(fn, "__qualname__", "").startswith("Module.to_empty.")  # torch.nn.Module.to_empty's lambda
        if not self.orders.is_meta and (was_meta or fresh):
            with torch.no_grad():
                for name, value in self._computed_buffers(torch.device("cpu"), self._tau.dtype).items():
                    getattr(self, name).copy_(value)
        return self

    def arch_probs(self) -> torch.Tensor:
        """softmax(arch_logits) as a detached fp32 CPU tensor (K,)."""
        if self.arch_logits is None:
            raise RuntimeError("arch_probs: this mixer has fixed orders (no arch_logits)")
        return torch.softmax(self.arch_logits.detach().float(), 0).cpu()

    def branch_weights(self) -> Branch:
        """The merge weights and which orders to compute.

        Returns:
            (w, idx): ``w`` (m,) fp32 weights of the computed orders (they sum to 1 in value), and ``idx`` (m,) the
            indices of those orders, or None when every order is computed.
        """
        return batched_branch_weights([self])[0]

    def forward(self, x: torch.Tensor, perm: torch.Tensor | None = None, branch: Branch | None = None) -> torch.Tensor:
        """Scan along every (or the sampled) order, merge, project.

        Args:
            x: (B, L, C) tokens in storage order (grid tokens row-major, then any extra token).
            perm: optional (L,) permutation of the token positions (SLWS): order k then visits ``perm[orders[k, t]]``
                at step t, which is exactly running the block on ``x[:, perm]`` and undoing the shuffle afterwards.
            branch: this layer's ``(w, idx)`` as :meth:`branch_weights` returns them, when the model drew every
                layer's at once (:func:`batched_branch_weights`); None draws them here.

        Returns:
            (B, L, C).
        """
        bsz, seqlen, _ = x.shape
        if self.orders.is_meta and not x.is_meta:
            raise RuntimeError(
                "the scan orders are still on the meta device: load weights into a meta-built model after "
                "model.to_empty(device=...), or after load_state_dict(..., assign=True) call "
                "reinit_non_persistent_buffers(model) from timm.models._manipulate"
            )
        if seqlen != self.orders.shape[1]:
            raise ValueError(f"mixer built for {self.orders.shape[1]} tokens (grid {self.grid}), got {seqlen}")
        w, idx = self.branch_weights() if branch is None else branch
        per_order = {name: getattr(self, name) for name in self.PER_ORDER}
        orders = self.orders
        if idx is not None:  # the sampled orders' rows of every per-order tensor: one gather (one launch each way)
            names = [name for name, p in per_order.items() if p is not None]
            taken = kernels.gather_rows(idx, [orders] + [per_order[n] for n in names], backend=self.scan_backend)
            orders = taken[0]
            per_order.update(zip(names, taken[1:]))
        if perm is not None:
            orders = perm.to(device=orders.device, dtype=orders.dtype)[orders]

        xz = self.in_proj(x)
        xin, z = xz.chunk(2, dim=-1) if self.gate else (xz, None)
        if self.conv2d is not None:
            h, wd = self.grid
            xin = xin.transpose(1, 2).reshape(bsz, self.d_inner, h, wd)
            xin = F.silu(self.conv2d(xin)).flatten(2).transpose(1, 2)
        if self.conv1d_weight is not None:
            u = kernels.causal_conv1d(
                xin.unsqueeze(2),
                per_order["conv1d_weight"],
                per_order["conv1d_bias"],
                orders=orders,
                activation="silu",
                backend=self.scan_backend,
            )  # (B, L, K, D)
        x_w, dt_w = self._padded_projections(per_order["x_proj_weight"], per_order["dt_proj_weight"])
        if self.conv1d_weight is None:
            u = xin.unsqueeze(2)  # (B, L, 1, D): one input shared by every order
        delta, b_ssm, c_ssm = order_projections(u, x_w, dt_w, self.d_state)
        # z is shared by the K orders and the plain merge is linear, so silu(z) ⊙ Σ_k w_k y_k is the same as gating
        # every order: one gate in the merge instead of K in the scan (whose backward is cheaper without z). The branch
        # attention pools LayerNorm'd branch outputs, which are not linear in y: its orders are gated in the scan.
        gate_after_merge = self.branch_attn is None
        # None: recompute the scan states when this call scans every candidate (the supernet's memory peak).
        recompute = orders.shape[0] == self.orders.shape[0] if self.scan_recompute is None else self.scan_recompute
        y = kernels.selective_scan(
            u,
            delta,
            -torch.exp(_fp32_or_wider(per_order["A_log"])),
            b_ssm,
            c_ssm,
            D=_fp32_or_wider(per_order["D"]),
            z=None if z is None or gate_after_merge else z.unsqueeze(2),
            delta_bias=_fp32_or_wider(per_order["dt_proj_bias"]),
            delta_softplus=True,
            orders=orders,
            backend=self.scan_backend,
            recompute_states=recompute,
        )  # (B, L, K, D), original token order
        # The merge over K: one pass over y forward and one backward on the triton backend (as broadcast products in
        # PyTorch, the gated merge wrote an fp32 LayerNorm output and several (B, L, K, D) temporaries each way).
        if self.branch_attn is not None:
            y = self.branch_attn(y, w, backend=self.scan_backend)
        else:
            y = kernels.branch_merge(y, w, z, backend=self.scan_backend)  # the gate after the merge
        if self.out_norm is not None:
            y = self.out_norm(y, gemm_input_dtype(y))  # read only by out_proj
        return self.out_proj(y)

    def _padded_projections(self, x_w: torch.Tensor, dt_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_proj and dt_proj weights with zero rows/columns so every GEMM dimension is a multiple of 8.

        x_proj (K, R + 2N, D) becomes (K, R' + 2N + pad, D) laid out [Δ rank | zeros | B | C | zeros] with R' = R
        rounded up to 8; dt_proj (K, D, R) becomes (K, D, R') with zero columns. The padded outputs are exactly zero
        and meet zero weights, so results and gradients are unchanged. Vim-Ti's R + 2N = 44 and R = 12 sent cuBLAS to
        its 1-element-aligned kernels: 22 of 95 ms per training step on an H200 (profile_model_vim_tiny_h200.json).
        Under a ``FlopCounterMode`` (outside torch.compile, ``torch.func`` and forward-mode AD) the weights stay
        unpadded, so a count sees the model's own GEMMs, not the zeros.
        """
        k, _, d = x_w.shape
        rank, n = self.dt_rank, self.d_state
        rank_p = -(-rank // 8) * 8
        tail = -(-(rank_p + 2 * n) // 8) * 8 - (rank_p + 2 * n)
        if (rank_p == rank and tail == 0) or flop_counting():
            return x_w, dt_w
        head, rest = x_w.split([rank, x_w.shape[1] - rank], 1)  # split: one cat backward, no zero-filled slices
        parts = [head, x_w.new_zeros(k, rank_p - rank, d), rest, x_w.new_zeros(k, tail, d)]
        return torch.cat(parts, 1), F.pad(dt_w, (0, rank_p - rank))

    def extra_repr(self) -> str:
        kind = f"search[{self.mode}]" if self.search else "fixed"
        return f"{kind}, orders=({', '.join(self.order_names)}), grid={self.grid}, d_inner={self.d_inner}"


def batched_branch_weights(mixers: Sequence[MultiOrderMixer]) -> list[Branch]:
    """Every mixer's :meth:`MultiOrderMixer.branch_weights`, the supernet layers drawn together.

    Search mixers alike in mode, K, top-m, training flag and device (a supernet's layers) are computed as
    one (layers, K) batch: one draw of noise, one top-m and one softmax for all of them, where layer by layer it was
    about a dozen small kernels each (and their backward), which an eager training step waits on the host for. Each
    layer's noise is independent of the others', as before; the draws are not the same numbers as layer by layer.

    Returns:
        One ``(w, idx)`` per mixer, in order.
    """
    out: list = [None] * len(mixers)
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(mixers):
        if not m.search:
            k = m.num_orders
            dtype = kernels.reference.compute_dtype(m.x_proj_weight)  # fp32; an fp64 model merges in fp64
            out[i] = (m.x_proj_weight.new_full((k,), 1.0 / k, dtype=dtype), None)
            continue
        # Not the temperature's Python float: a compiled step would guard on it and recompile when it changes (gdas).
        key = (m.mode, m.num_orders, m.top_m, m.training, m.arch_logits.device, m.min_global, m.order_names)
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        for i, wi in zip(members, _group_branch_weights([mixers[i] for i in members])):
            out[i] = wi
    return out


def derived_top_m(logits: torch.Tensor, m: int, is_global: torch.Tensor, min_global: int) -> torch.Tensor:
    """:func:`search_spaces.select_top_k` on the device, per row of ``logits`` (..., K): the ``m`` most probable
    candidates (fp32 softmax, as derivation reads them), the best ``min(min_global, m)`` of the global ones
    (``is_global`` (K,)) reserved, ties toward the earlier candidate; indices in candidate order (..., m). No host
    round trip, so an eval step can be captured as a CUDA graph."""
    k = logits.shape[-1]
    ranked = torch.sort(torch.softmax(logits.float(), -1), dim=-1, descending=True, stable=True).indices
    steps = torch.arange(k, device=logits.device).expand_as(ranked)
    rank = torch.empty_like(ranked).scatter_(-1, ranked, steps)  # each candidate's place, 0 = most probable
    g = min(int(min_global), m)
    if g > 0:
        glob = is_global.to(logits.device)[ranked]  # in ranked order
        reserved = glob & (torch.cumsum(glob.long(), -1) <= g)  # the best g global candidates
        rank = rank - k * torch.zeros_like(glob).scatter_(-1, ranked, reserved).long()  # reserved ones first
    return torch.sort(rank, dim=-1, stable=True).indices[..., :m].sort(-1).values


def _group_branch_weights(group: list[MultiOrderMixer]) -> list[Branch]:
    """(w, idx) of search mixers alike in mode, K, top-m, training flag and device, as one batch."""
    first = group[0]
    if len(group) == 1:
        logits, tau = _fp32_or_wider(first.arch_logits).unsqueeze(0), first._tau
    else:
        logits = _fp32_or_wider(torch.stack([m.arch_logits for m in group]))  # (layers, K)
        tau = torch.stack([m._tau for m in group]).unsqueeze(1).to(logits.dtype)  # each layer's own temperature
    sampling = first.training and first.mode != "softmax"
    if sampling:
        # Noise from the default generator of the logits' device: no host round trip (a pageable copy stalled the
        # host every layer), and a step can be captured as a CUDA graph (each replay draws afresh).
        u = torch.rand(logits.shape, device=logits.device).clamp_(1e-10, 1.0 - 1e-7)
        logits = logits - torch.log(-torch.log(u))
    # A view per layer: unbind's backward is one stack; squeeze's (one layer) is a view, where select's is two kernels.
    rows = (lambda t: t.unbind(0)) if len(group) > 1 else (lambda t: (t.squeeze(0),))
    if first.mode == "softmax" or (first.mode == "gumbel" and not sampling):
        return [(w, None) for w in rows(torch.softmax(logits, -1))]
    if first.mode == "gumbel":
        return [(w, None) for w in rows(torch.softmax(logits / tau, -1))]
    # hard: top-m of the (noisy) logits, uniform 1/m in value, Gumbel-softmax straight-through gradient; in eval
    # mode the orders derivation keeps.
    if sampling:
        idx = torch.topk(logits.detach(), first.top_m, dim=-1).indices.sort(-1).values
    else:
        idx = derived_top_m(logits.detach(), first.top_m, first._is_global, first.min_global)
    soft = torch.softmax(logits / tau, -1).gather(-1, idx)
    w = soft - soft.detach() + 1.0 / first.top_m
    return list(zip(rows(w), rows(idx)))


def slice_mixer_state(
    state: dict[str, torch.Tensor], prefix: str, src_orders: Sequence[str], dst_orders: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Rows of a supernet mixer's per-order tensors for a child's orders.

    Args:
        state: a state dict holding the source mixer's tensors under ``prefix``.
        prefix: the mixer's key prefix, e.g. ``"blocks.3.mixer."``.
        src_orders: the source mixer's order names (its K axis).
        dst_orders: the child's order names; each must be one of ``src_orders``.

    Returns:
        The mixer's tensors for the child: per-order ones indexed along K, shared ones as they are, no
        ``arch_logits``.
    """
    missing = [o for o in dst_orders if o not in src_orders]
    if missing:
        raise ValueError(f"{prefix[:-1]}: orders {missing} are not among the source orders {list(src_orders)}")
    idx = torch.tensor([list(src_orders).index(o) for o in dst_orders], dtype=torch.long)
    out = {}
    for key, val in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name == "arch_logits":
            continue
        out[key] = val.index_select(0, idx.to(val.device)) if name in MultiOrderMixer.PER_ORDER else val
    return out
