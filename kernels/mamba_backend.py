"""The ``mamba`` backend: mamba-ssm's CUDA selective scan over K orders, through explicit gathers.

All K orders go to mamba-ssm in ONE launch: the gathered inputs are laid out as (B, K·D, L) channels with B/C as
K groups (channel k·D + d uses group k), which is how mamba-ssm's grouped B/C work. The gathers into scan order and
the inverse gather of the output are ordinary PyTorch ops (differentiable). This backend is the comparison anchor
for the fused Triton scan, not a fast path.
"""

from __future__ import annotations

import torch

from .reference import _gather_tokens, _scatter_tokens

__all__ = ["load_selective_scan_fn", "selective_scan_mamba", "to_mamba_layout"]


def load_selective_scan_fn():
    """mamba-ssm's ``selective_scan_fn``; raises ImportError with the install hint when mamba-ssm is missing."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'mamba' scan backend needs mamba-ssm (CUDA only): install it with `pip install .[cuda]`"
        ) from err
    return selective_scan_fn


def to_mamba_layout(
    u: torch.Tensor,
    delta: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    z: torch.Tensor | None,
    orders: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gather token-major inputs into mamba-ssm's channel-major, scan-ordered layout.

    Args:
        u: (B, L, Ku, D). delta: (B, L, K, D). B, C: (B, L, K, N). z: (B, L, Kz, D) or None. orders: (K, L) or None.

    Returns:
        u, delta, z as (B, K·D, L); B, C as (B, K, N, L) (K groups); all contiguous and in scan order.
    """
    k = delta.shape[2]

    def chan(x: torch.Tensor) -> torch.Tensor:
        x = _gather_tokens(x, orders, k)  # (B, L, K, D)
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1]).contiguous()

    def groups(x: torch.Tensor) -> torch.Tensor:
        return _gather_tokens(x, orders, k).permute(0, 2, 3, 1).contiguous()

    return chan(u), chan(delta), groups(B), groups(C), chan(z) if z is not None else None


def selective_scan_mamba(
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
    """K-order selective scan with mamba-ssm's CUDA kernel (one launch for all orders). Same signature as the ref.

    Args:
        u: (B, L, Ku, D). delta: (B, L, K, D). A: (K, D, N). B, C: (B, L, K, N). D, delta_bias: (K, D) or None.
        z: (B, L, Kz, D) or None. orders: (K, L) or None. out_dtype: output dtype (default ``u.dtype``).

    Returns:
        y: (B, L, K, D) in original token order.
    """
    selective_scan_fn = load_selective_scan_fn()
    if u.device.type != "cuda":
        raise ValueError(f"u: the 'mamba' backend expects a CUDA device, got {u.device}")
    bsz, seqlen, k, dim = delta.shape
    us, ds, Bs, Cs, zs = to_mamba_layout(u, delta, B, C, z, orders)
    y = selective_scan_fn(
        us,
        ds,
        A.reshape(k * dim, -1),
        Bs,
        Cs,
        D.reshape(-1) if D is not None else None,
        zs,
        delta_bias.reshape(-1) if delta_bias is not None else None,
        delta_softplus,
    )
    y = y.reshape(bsz, k, dim, seqlen).permute(0, 3, 1, 2)  # (B, L, K, D), scan order
    return _scatter_tokens(y, orders).to(out_dtype or u.dtype)
