"""Pure-PyTorch references for the order-dependent ops: the truth every fast path is tested against.

Layout is token-major (what Linear layers produce), with K scan orders on a separate axis:

    u      (B, L, Ku, D)   Ku = 1 (one input shared by every order) or K
    delta  (B, L, K, D)    A (K, D, N) fp32     Bm, Cm (B, L, K, N)
    Dskip  (K, D) fp32     delta_bias (K, D) fp32     z (B, L, Kz, D), Kz in {1, K}
    orders (K, L) int      step t of order k visits token orders[k, t]
    y      (B, L, K, D)    in ORIGINAL token order

Everything is computed in fp32 (in fp64 when ``u`` is fp64: the GPU correctness grid's truth for fp32 cases) and cast
to ``out_dtype`` (default: the dtype of ``u``) at the end.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

__all__ = [
    "branch_attn_merge_ref",
    "branch_merge_ref",
    "causal_conv1d_ref",
    "compute_dtype",
    "gather_rows_ref",
    "selective_scan_ref",
]


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The references' compute dtype: fp64 when any of the tensors is fp64, else fp32 (non-tensors are skipped)."""
    fp64 = any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if fp64 else torch.float32


def _gather_tokens(x: torch.Tensor, orders: torch.Tensor | None, k: int) -> torch.Tensor:
    """(B, L, Kx, ...) → (B, L, K, ...) with ``out[:, t, j] = x[:, orders[j, t], j or 0]``."""
    if x.shape[2] == 1 and k > 1:
        x = x.expand(x.shape[0], x.shape[1], k, *x.shape[3:])
    if orders is None:
        return x
    idx = orders.t().to(device=x.device, dtype=torch.long)  # (L, K)
    idx = idx.view(1, idx.shape[0], idx.shape[1], *([1] * (x.dim() - 3))).expand(x.shape)
    return torch.gather(x, 1, idx)


def _scatter_tokens(y: torch.Tensor, orders: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`_gather_tokens` for K == Kx: scan order back to original token order."""
    if orders is None:
        return y
    inv = torch.argsort(orders.to(device=y.device, dtype=torch.long), dim=1).t()  # (L, K)
    inv = inv.view(1, inv.shape[0], inv.shape[1], *([1] * (y.dim() - 3))).expand(y.shape)
    return torch.gather(y, 1, inv)


def selective_scan_ref(
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
    """Mamba-1 selective scan over K token orders (reference).

    For each (b, k, d, n), stepping t along ``orders[k]``:
    ``x_t = exp(Δ_t·A) x_{t-1} + Δ_t·B_t·u_t``, ``y_t = Σ_n C_t[n]·x_t[n] + D·u_t``, then ``y · silu(z)`` if z.

    Args:
        u: (B, L, Ku, D). delta: (B, L, K, D). A: (K, D, N). B, C: (B, L, K, N).
        D: (K, D) or None. z: (B, L, Kz, D) or None. delta_bias: (K, D) or None.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        orders: (K, L) integer permutations, or None for the identity order.
        out_dtype: dtype of ``y``; defaults to ``u.dtype``.

    Returns:
        y: (B, L, K, D) in original token order, computed in fp32 (fp64 for fp64 inputs; autocast off).
    """
    with autocast_off(u.device):  # the state and its sums in fp32 (or fp64), as the kernels keep them, autocast or not
        return _selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, orders, out_dtype)


def _selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, orders, out_dtype):
    out_dtype = out_dtype or u.dtype
    ct = compute_dtype(u, delta, A)
    k = delta.shape[2]
    u32 = u.to(ct)
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)
    if delta_softplus:
        dt = F.softplus(dt)
    u_k = u32.expand(-1, -1, k, -1) if u32.shape[2] == 1 else u32  # (B, L, K, D)
    # Reorder the 4-D inputs (not the 5-D products) into scan order: N times fewer elements to gather and scatter.
    dt_s, u_s = _gather_tokens(dt, orders, k), _gather_tokens(u_k, orders, k)
    B_s, C_s = _gather_tokens(B.to(ct), orders, k), _gather_tokens(C.to(ct), orders, k)
    dA = torch.exp(dt_s.unsqueeze(-1) * A.to(ct))  # (B, L, K, D, N), scan order
    dBu = (dt_s * u_s).unsqueeze(-1) * B_s.unsqueeze(3)  # (B, L, K, D, N), scan order
    x = torch.zeros_like(dA[:, 0])
    ys = []
    for dA_t, dBu_t, C_t in zip(dA.unbind(1), dBu.unbind(1), C_s.unbind(1)):
        x = dA_t * x + dBu_t
        ys.append(torch.einsum("bkdn,bkn->bkd", x, C_t))
    y = _scatter_tokens(torch.stack(ys, dim=1), orders)
    if D is not None:
        y = y + u_k * D.to(ct)
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(out_dtype)


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    orders: torch.Tensor | None = None,
    activation: str | None = "silu",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Causal depthwise conv1d along each of K token orders (reference).

    Step t of order k sees the tokens visited at steps t-W+1..t of that order (zeros before the start), as
    ``nn.Conv1d(groups=D, padding=W-1)`` truncated to the first L outputs.

    Args:
        x: (B, L, Kx, D), Kx in {1, K}. weight: (K, D, W). bias: (K, D) or None.
        orders: (K, L) integer permutations, or None for the identity order.
        activation: ``"silu"`` or None.
        out_dtype: dtype of the output; defaults to ``x.dtype``.

    Returns:
        (B, L, K, D) in original token order, computed in fp32 (fp64 for fp64 inputs).
    """
    out_dtype = out_dtype or x.dtype
    ct = compute_dtype(x, weight)
    k, _, width = weight.shape
    xs = _gather_tokens(x.to(ct), orders, k)  # (B, L, K, D)
    xs = F.pad(xs, (0, 0, 0, 0, width - 1, 0))  # left-pad along L
    w = weight.to(ct)
    out = sum(xs[:, j : j + x.shape[1]] * w[:, :, j] for j in range(width))
    if bias is not None:
        out = out + bias.to(ct)
    if activation == "silu":
        out = F.silu(out)
    elif activation is not None:
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    return _scatter_tokens(out, orders).to(out_dtype)


def autocast_off(device: torch.device):
    """A context that turns autocast off for ``device``'s type when it is on (and does nothing where it cannot be)."""
    kind = device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def branch_merge_ref(y: torch.Tensor, w: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
    """The mixer's merge of K orders (reference): ``Σ_k w_k · y[:, :, k]``, times ``silu(z)`` with a gate.

    Args:
        y: (B, L, K, D). w: (K,) merge weights. z: optional (B, L, D) gate input shared by the K orders; since the merge
            is linear, ``silu(z) ⊙ Σ_k w_k y_k`` equals gating every order's output before the merge.

    Returns:
        (B, L, D) in y's dtype, computed in fp32 (fp64 for fp64 inputs).
    """
    ct = compute_dtype(y)
    out = (y.to(ct) * w.to(ct).view(1, 1, -1, 1)).sum(2)
    if z is not None:
        out = out * F.silu(z.to(ct))
    return out.to(y.dtype)


def branch_attn_merge_ref(y, w, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps=1e-5):
    """LocalMamba's per-branch channel gate, then the merge (reference).

    ``out = Σ_k w_k · g_k ⊙ y[:, :, k]`` with ``g_k = σ(fc2(gelu(fc1(mean_L LayerNorm(y[:, :, k])))))``, one gate per
    sample and order (LocalMamba's ``BiAttn``, channel part).

    Args:
        y: (B, L, K, D). w: (K,). norm_weight, norm_bias: (D,). fc1: (H, D), (H,). fc2: (D, H), (D,).

    Returns:
        (B, L, D) in y's dtype, computed in fp32 (fp64 for fp64 inputs; autocast off).
    """
    ct = compute_dtype(y)
    with autocast_off(y.device):
        yf = y.to(ct)
        nw, nb, w1, b1, w2, b2 = (
            t.to(ct) for t in (norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
        )
        pooled = F.layer_norm(yf, yf.shape[-1:], nw, nb, eps).mean(1)  # (B, K, D)
        g = torch.sigmoid(F.linear(F.gelu(F.linear(pooled, w1, b1)), w2, b2))
        out = (yf * (g * w.to(ct).view(1, -1, 1)).unsqueeze(1)).sum(2)
    return out.to(y.dtype)


def gather_rows_ref(idx: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rows ``idx`` (m,) of every tensor (K, ...) along dim 0: ``[t.index_select(0, idx) for t in tensors]``."""
    idx = idx.long()
    return [t.index_select(0, idx.to(t.device)) for t in tensors]
