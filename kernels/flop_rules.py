"""FLOP rules of the order-dependent ops, in the convention of the published vision-Mamba tables (fvcore: one per
multiply-add; VMamba's rule for the scan), and in ``FlopCounterMode``'s (two per multiply-add, as it counts matmuls).

The registered ops (:mod:`kernels.library`, :mod:`kernels.ref_ops`) report :func:`counter_flops` of these rules, so
``FlopCounterMode``'s total halved is the published-convention count, the number :func:`supernet.count_params_flops`
gives, on every backend.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["attn_merge_flops", "conv_flops", "counter_flops", "gate_flops", "scan_flops"]


def scan_flops(delta_shape: Sequence[int], A_shape: Sequence[int], has_D: bool, has_z: bool) -> int:
    """VMamba's FLOP rule for a K-order scan: 9·B·L·K·D·N (+ B·L·K·D for D, + B·L·K·D for z)."""
    bsz, seqlen, k, dim = delta_shape
    n = A_shape[2]
    flops = 9 * bsz * seqlen * k * dim * n
    return flops + bsz * seqlen * k * dim * (int(has_D) + int(has_z))


def conv_flops(x_shape: Sequence[int], weight_shape: Sequence[int]) -> int:
    """The per-order causal conv1d: one multiply-add per output element and tap, B·L·K·D·W."""
    k, dim, width = weight_shape
    return x_shape[0] * x_shape[1] * k * dim * width


def gate_flops(y_shape: Sequence[int]) -> int:
    """A z gate applied once after the merge: B·L·K·D, counted per order as VMamba's rule counts it inside the scan,
    so a model's count does not depend on where its gate runs."""
    bsz, seqlen, k, dim = y_shape
    return bsz * seqlen * k * dim


def attn_merge_flops(y_shape: Sequence[int], fc1_shape: Sequence[int]) -> int:
    """LocalMamba's per-branch channel gate: its two linear layers on each sample's and order's pooled vector,
    2·B·K·D·H (the LayerNorm, pooling and products are elementwise, which the convention does not count)."""
    bsz, _, k, dim = y_shape
    return 2 * bsz * k * dim * fc1_shape[0]


def counter_flops(flops: int) -> int:
    """A rule's count in ``FlopCounterMode``'s convention: two per multiply-add."""
    return 2 * flops
