"""The N = 16 backward's tile with the fixed-point channel sums on (the default), same run: (steps per chunk, states
per group) = (8, 4) (the default config), (4, 8) and (16, 2), each with 32 rows per group as the fixed sums need, and
(8, 4) with the butterfly sums for reference. Device kernel time of the backward; writes ``$OUT/tiles.json``.

    GIT_COMMIT=<sha> python benchmarks/fixed_sums_h200/tiles.py
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixed_sums import timed_backward

import kernels.triton_scan as ts
from kernels.check_gpu import env_info
from kernels.testing import make_orders, make_scan_inputs

SHAPES = [
    ("vim_ti", 128, 384, 197, 16, 2, (14, 14), True),
    ("localvim_t_super", 128, 384, 197, 16, 8, (14, 14), True),
    ("len3136_b32", 32, 192, 3136, 16, 4, (56, 56), False),
]
# (config, fixed sums)
TILES = [
    ((8, 32, 1, 4, 32, 1, 4, 0, 1), False),
    ((8, 32, 1, 4, 32, 1, 4, 0, 1), True),
    ((4, 32, 1, 4, 32, 1, 8, 0, 1), True),
    ((16, 32, 1, 4, 32, 1, 2, 0, 1), True),
]


def main() -> None:
    out = {**env_info(os.environ.get("GIT_COMMIT")), "rows": []}
    for name, batch, dim, L, n, k, hw, z in SHAPES:
        torch.manual_seed(0)
        inp = make_scan_inputs(batch, L, k, dim, n, ku=1, dtype=torch.bfloat16, device="cuda", has_z=z)
        orders = make_orders(L, hw, k, ("h", "v", "h_flip", "v_flip", "w2", "w2_flip", "w7", "w7_flip")[:k])
        orders = orders.cuda().to(torch.int32)
        dy = torch.randn(batch, L, k, dim, device="cuda", dtype=torch.bfloat16)
        for cfg, fixed in TILES:
            ts.set_fixed_channel_sums(fixed)
            ts.set_scan_config(n, L, cfg)
            _, _, bwd, _ = timed_backward(inp, orders, dy)
            print(f"{name:18s} {str(cfg):34s} fixed={int(fixed)} bwd kernels {bwd:.4f} ms", flush=True)
            out["rows"].append({"shape": name, "config": list(cfg), "fixed": fixed, "bwd_kernel_ms": bwd})
        ts.set_scan_config(n, L, None)
    ts.set_fixed_channel_sums(True)
    with open(os.path.join(os.environ.get("OUT", "."), "tiles.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
