"""Order-dependent ops for vision Mamba: the selective scan and causal conv1d over K token orders in one call."""

from . import library, ref_ops  # register the torch.library ops and their FLOP formulas before any FlopCounterMode
from .ops import (
    BACKENDS,
    add_rms_norm,
    branch_attn_merge,
    branch_merge,
    causal_conv1d,
    gather_rows,
    layer_norm,
    resolve_backend,
    rms_norm,
    selective_scan,
    validate_scan_inputs,
)
from .reference import (
    branch_attn_merge_ref,
    branch_merge_ref,
    causal_conv1d_ref,
    gather_rows_ref,
    selective_scan_ref,
)
from .triton_scan import (
    CHANNEL_SUMS,
    channel_sums,
    set_channel_sums,
    set_fixed_channel_sums,
    set_packed_channel_sums,
)

__all__ = [
    "BACKENDS",
    "CHANNEL_SUMS",
    "add_rms_norm",
    "branch_attn_merge",
    "branch_attn_merge_ref",
    "branch_merge",
    "branch_merge_ref",
    "causal_conv1d",
    "causal_conv1d_ref",
    "channel_sums",
    "gather_rows",
    "gather_rows_ref",
    "layer_norm",
    "library",
    "ref_ops",
    "resolve_backend",
    "rms_norm",
    "selective_scan",
    "selective_scan_ref",
    "set_channel_sums",
    "set_fixed_channel_sums",
    "set_packed_channel_sums",
    "validate_scan_inputs",
]
