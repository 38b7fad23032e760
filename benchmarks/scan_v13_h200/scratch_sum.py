"""dB/dC channel sums: butterfly (default) vs per-program scratch transpose (SCRATCH_SUM). Device kernel time of the
backward, gradients of the scratch run against the butterfly run.

Ran on the tree of e1adb72 with the SCRATCH_SUM variant applied (a constexpr of the backward kernel and a
``_SCRATCH_SUM`` switch in ``kernels.triton_scan``; NOTES-scan.md v13). The variant was not kept, so this script does
not run on the committed tree; it is kept as the record of what was measured."""

import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
import kernels.triton_scan as ts
from kernels.bench import kernel_times
from kernels.check_gpu import env_info
from kernels.testing import make_orders, make_scan_inputs

SHAPES = [
    ("vim_ti", 128, 384, 197, 16, 2, (14, 14), True),
    ("localvim_t_super", 128, 384, 197, 16, 8, (14, 14), True),
    ("len2048_b12", 12, 192, 2048, 16, 4, (32, 64), False),
    ("len3136_b32", 32, 192, 3136, 16, 4, (56, 56), False),
]
CFGS = [
    (8, 32, 1, 4, 32, 1, 4, 0, 1),
    (8, 32, 1, 4, 32, 1, 8, 0, 1),
    (8, 32, 1, 4, 32, 1, 2, 0, 1),
    (4, 32, 1, 4, 32, 1, 8, 0, 1),
]
out = {**env_info(os.environ.get("GIT_COMMIT")), "rows": []}
gain = {}
for name, batch, dim, L, n, k, hw, z in SHAPES:
    torch.manual_seed(0)
    inp = make_scan_inputs(batch, L, k, dim, n, ku=1, dtype=torch.bfloat16, device="cuda", has_z=z)
    orders = (
        make_orders(L, hw, k, ("h", "v", "h_flip", "v_flip", "w2", "w2_flip", "w7", "w7_flip")[:k])
        .cuda()
        .to(torch.int32)
    )
    dy = torch.randn(batch, L, k, dim, device="cuda", dtype=torch.bfloat16)
    ref = None
    for cfg in CFGS:
        for scr in (False, True):
            ts._SCRATCH_SUM = scr
            ts.set_scan_config(n, L, cfg)
            leaves = {
                a: (v.detach().requires_grad_() if v is not None and v.is_floating_point() else v)
                for a, v in inp.items()
            }

            def fb(leaves=leaves, orders=orders, dy=dy):
                for v in leaves.values():
                    if isinstance(v, torch.Tensor) and v.requires_grad:
                        v.grad = None
                ts.selective_scan_triton(**leaves, orders=orders, delta_softplus=True).backward(dy)

            try:
                fb()
            except Exception as e:
                print(name, cfg, scr, "failed", repr(e)[:200])
                continue
            grads = {
                a: v.grad.float().clone()
                for a, v in leaves.items()
                if isinstance(v, torch.Tensor) and v.grad is not None
            }
            if ref is None:
                ref = grads
            err = max(((grads[a] - ref[a]).norm() / ref[a].norm().clamp_min(1e-30)).item() for a in ref)
            kt = kernel_times(fb, reps=10)
            bwd = sum(t for nm, t, _ in kt if "bwd" in nm)
            tot = sum(t for nm, t, _ in kt)
            print(
                f"{name:20s} {str(cfg):34s} scratch={int(scr)} bwd kernels {bwd:.4f} ms  all {tot:.4f} ms  "
                f"rel err {err:.2e}",
                flush=True,
            )
            out["rows"].append(
                {
                    "shape": name,
                    "config": list(cfg),
                    "scratch": scr,
                    "bwd_kernel_ms": bwd,
                    "all_kernel_ms": tot,
                    "rel_err_vs_first": err,
                    "kernels": [(nm[:60], t, c) for nm, t, c in kt[:6]],
                }
            )
            gain[(name, cfg, scr)] = bwd
    ts.set_scan_config(n, L, None)
base = gain.get(("vim_ti", CFGS[0], False))
new = gain.get(("vim_ti", CFGS[0], True))
out["vim_ti_default_gain"] = base / new if base and new else None
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "scratch_sum.json"), "w"), indent=1)
print("vim_ti default: butterfly", base, "scratch", new)
