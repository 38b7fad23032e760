"""dB/dC channel sums of the (T, N, D) backward three ways, same run: fp32 butterfly shuffles, exact fixed-point warp
reductions (``kernels.set_fixed_channel_sums``) and packed bf16 pairs (``kernels.set_packed_channel_sums``).

Device kernel time of the backward (torch.profiler), and for the Vim-Ti layer the relative error of every gradient
against the PyTorch reference run in fp64 on the same inputs. Writes ``$OUT/fixed_sums.json`` (``SHAPES="a b"``: only
those rows).

    GIT_COMMIT=<sha> python benchmarks/fixed_sums_h200/fixed_sums.py
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
import kernels.triton_scan as ts
from kernels.bench import kernel_times
from kernels.check_gpu import env_info
from kernels.reference import selective_scan_ref
from kernels.testing import make_orders, make_scan_inputs

# name, batch, channels, L, N, K, grid, z, fp64 truth
SHAPES = [
    ("vim_ti", 128, 384, 197, 16, 2, (14, 14), True, True),
    ("localvim_t_super", 128, 384, 197, 16, 8, (14, 14), True, False),
    ("len2048_b12", 12, 192, 2048, 16, 4, (32, 64), False, False),
    ("len3136_b32", 32, 192, 3136, 16, 4, (56, 56), False, False),
    ("vmamba_t_s1", 128, 192, 3136, 1, 4, (56, 56), False, False),
    ("vmamba_t_s3", 128, 768, 196, 1, 4, (14, 14), False, False),
    # the z gate swapped: does the gain follow L or the gate?
    ("vim_ti_noz", 128, 384, 197, 16, 2, (14, 14), False, False),
    ("len2048_b12_z", 12, 192, 2048, 16, 4, (32, 64), True, False),
    ("len784_b32_z", 32, 192, 784, 16, 4, (28, 28), True, False),
]
MODES = {"butterfly": (False, False), "fixed": (True, False), "packed": (False, True)}
ORDERS = ("h", "v", "h_flip", "v_flip", "w2", "w2_flip", "w7", "w7_flip")


def timed_backward(inp: dict, orders: torch.Tensor, dy: torch.Tensor) -> tuple[dict, list, float, float]:
    """Forward+backward of the Triton scan on fresh leaves of ``inp``, once to warm up and ten times under the
    profiler: (leaves with their gradients, kernel rows, backward kernels ms, all kernels ms)."""
    leaves = {a: (v.detach().requires_grad_() if v is not None else None) for a, v in inp.items()}

    def fb():
        for v in leaves.values():
            if v is not None:
                v.grad = None
        ts.selective_scan_triton(**leaves, orders=orders, delta_softplus=True).backward(dy)

    fb()
    kt = kernel_times(fb, reps=10)  # each call recomputes the same gradients into the leaves
    return leaves, kt, sum(t for nm, t, _ in kt if "bwd" in nm), sum(t for nm, t, _ in kt)


def main() -> None:
    out = {**env_info(os.environ.get("GIT_COMMIT")), "rows": []}
    only = os.environ.get("SHAPES", "").split()
    for name, batch, dim, L, n, k, hw, z, truth in SHAPES:
        if only and name not in only:
            continue
        torch.manual_seed(0)
        inp = make_scan_inputs(batch, L, k, dim, n, ku=1, dtype=torch.bfloat16, device="cuda", has_z=z)
        orders = make_orders(L, hw, k, ORDERS[:k]).cuda().to(torch.int32)
        dy = torch.randn(batch, L, k, dim, device="cuda", dtype=torch.bfloat16)
        ref = None
        if truth:
            leaves = {a: (v.detach().double().requires_grad_() if v is not None else None) for a, v in inp.items()}
            selective_scan_ref(**leaves, orders=orders.long(), delta_softplus=True).backward(dy.double())
            ref = {a: v.grad for a, v in leaves.items() if v is not None and v.grad is not None}
            del leaves
        for mode, (fixed, packed) in MODES.items():
            ts.set_fixed_channel_sums(fixed)
            ts.set_packed_channel_sums(packed)
            leaves, kt, bwd, tot = timed_backward(inp, orders, dy)
            errs = {}
            if ref is not None:
                errs = {a: float((v.grad.double() - ref[a]).norm() / ref[a].norm()) for a, v in leaves.items()
                        if v is not None and v.grad is not None}  # fmt: skip
            err_txt = "  ".join(f"{a} {e:.2e}" for a, e in errs.items() if a in ("B", "C", "u", "delta"))
            print(f"{name:18s} {mode:9s} bwd kernels {bwd:.4f} ms  all {tot:.4f} ms  {err_txt}", flush=True)
            out["rows"].append({"shape": name, "batch": batch, "dim": dim, "L": L, "N": n, "K": k, "mode": mode,
                                "bwd_kernel_ms": bwd, "all_kernel_ms": tot, "rel_err_vs_fp64": errs,
                                "kernels": [(nm[:60], t, c) for nm, t, c in kt[:6]]})  # fmt: skip
    ts.set_fixed_channel_sums(False)
    ts.set_packed_channel_sums(False)
    with open(os.path.join(os.environ.get("OUT", "."), "fixed_sums.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
