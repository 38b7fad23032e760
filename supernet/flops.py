"""Parameter and FLOP counts of a model, in the convention of the published vision-Mamba tables.

Published Vim/VMamba/LocalMamba/MambaOut "FLOPs" are fvcore counts: one per multiply-add of a matmul or conv, plus
VMamba's rule for a selective scan (9·B·L·D·N, + B·L·D for the D skip, + B·L·D for the z gate, per order). This
module reproduces that: ``torch.utils.flop_counter.FlopCounterMode`` counts every dense op (2 per multiply-add, so
halved), and the order-dependent ops are counted by their rules (:mod:`kernels.flop_rules`), whatever backend would
run them:

* ``kernels.selective_scan``: :func:`kernels.flop_rules.scan_flops`;
* ``kernels.causal_conv1d``: one multiply-add per output element and tap, B·L·K·D·W;
* ``kernels.branch_merge`` with a z gate (Vim's, applied once after the merge): B·L·K·D, the gate counted per order as
  the rule counts it inside the scan, so a model's count does not depend on where its gate runs.

A user's own ``FlopCounterMode`` sees the same rules (the registered ops report them, on the ``ref`` backend too:
:mod:`kernels.ref_ops`), so its total halved equals this count. Here the three ops are replaced by stand-ins that
return zeros of the right shape and add their rule to a tally: a count at 224² then takes seconds on a CPU, where the
reference scan would take minutes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import kernels
from kernels.flop_rules import conv_flops, gate_flops, scan_flops

from ._base import to_size

__all__ = ["count_params_flops"]


@contextmanager
def _counted_order_ops(tally: list[int]) -> Iterator[None]:
    """Swap ``kernels.selective_scan`` / ``causal_conv1d`` / ``branch_merge`` for zero-output stand-ins that add to
    ``tally``."""
    real_scan, real_conv, real_merge = kernels.selective_scan, kernels.causal_conv1d, kernels.branch_merge

    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, orders=None, **kwargs):
        kernels.validate_scan_inputs(u, delta, A, B, C, D, z, delta_bias, orders)
        tally.append(scan_flops(tuple(delta.shape), tuple(A.shape), D is not None, z is not None))
        return torch.zeros_like(delta, dtype=kwargs.get("out_dtype") or u.dtype)

    def conv(x, weight, bias=None, orders=None, **kwargs):
        tally.append(conv_flops(x.shape, weight.shape))
        return x.new_zeros(x.shape[0], x.shape[1], weight.shape[0], weight.shape[1])

    def merge(y, w, z=None, **kwargs):
        if z is not None:
            tally.append(gate_flops(y.shape))
        return y.new_zeros(y.shape[0], y.shape[1], y.shape[3])

    kernels.selective_scan, kernels.causal_conv1d, kernels.branch_merge = scan, conv, merge
    try:
        yield
    finally:
        kernels.selective_scan, kernels.causal_conv1d, kernels.branch_merge = real_scan, real_conv, real_merge


def count_params_flops(model: nn.Module, img_size: int | Sequence[int], in_chans: int = 3) -> tuple[int, int]:
    """Parameters and FLOPs (multiply-adds, fvcore convention) of one forward pass on one image in eval mode.

    Args:
        model: any module taking (1, in_chans, H, W); a supernet in ``softmax``/``gumbel`` mode counts every order,
            in ``hard`` mode its ``top_m``.
        img_size: H or (H, W).
        in_chans: input channels.

    Returns:
        (number of parameters, FLOPs).
    """
    height, width = to_size(img_size)
    params = sum(p.numel() for p in model.parameters())
    tally: list[int] = []
    was_training = model.training
    model.eval()
    try:
        ref = next(model.parameters())
        x = torch.zeros(1, in_chans, height, width, device=ref.device, dtype=ref.dtype)
        with torch.no_grad(), _counted_order_ops(tally), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return params, int(counter.get_total_flops() // 2 + sum(tally))
