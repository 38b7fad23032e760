"""The per-order causal conv1d's forward + backward at the models' shapes: device time per kernel (torch.profiler)
and, with ``CONFIGS="32,32,4 16,64,4"``, the backward's block sizes swept. Each config's gradients are checked against
the first one's. Runs against whichever ``kernels`` package is first on the path, so the same script times an older
tree in the same run (``PYTHONPATH=old_tree``). Writes ``$OUT/conv_bwd_<TAG>.json``.

    GIT_COMMIT=<sha> TAG=new CONFIGS="32,32,4 16,64,4" python benchmarks/conv_bwd_h200/conv_bwd.py
"""

import functools
import json
import os
import sys

import torch

if os.environ.get("PYTHONPATH") is None:
    sys.path.insert(0, os.getcwd())
import kernels.triton_conv as tc
from kernels.bench import kernel_times
from kernels.check_gpu import env_info
from kernels.ops import causal_conv1d
from kernels.testing import make_orders

# name, batch, channels, L, K, grid
SHAPES = [
    ("vim_ti", 128, 384, 197, 2, (14, 14)),
    ("localvim_t_child", 128, 384, 197, 4, (14, 14)),
    ("localvim_t_super", 128, 256, 197, 8, (14, 14)),
    ("b8_l785", 8, 384, 785, 2, (28, 28)),
]
NAMES = ("h", "h_flip", "v", "v_flip", "w2", "w2_flip", "w7", "w7_flip")


def _fwd_bwd(x, weight, bias, orders, dy):
    out = causal_conv1d(x, weight, bias, orders=orders, backend="triton")
    return torch.autograd.grad(out, (x, weight, bias), dy)


def main() -> int:
    tag = os.environ.get("TAG", "run")
    configs = [tuple(int(v) for v in c.split(",")) for c in os.environ.get("CONFIGS", "").split()] or [None]
    rows = []
    for name, bsz, dim, seqlen, k, hw in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        orders = make_orders(seqlen, hw, k, NAMES[:k]).cuda()
        xz = torch.randn(bsz, seqlen, 2 * dim, device="cuda", generator=gen, dtype=torch.bfloat16)
        x = xz[..., :dim].unsqueeze(2).detach().requires_grad_()  # a strided slice, as in the mixer
        weight = (0.5 * torch.randn(k, dim, 4, device="cuda", generator=gen)).requires_grad_()
        bias = torch.randn(k, dim, device="cuda", generator=gen).requires_grad_()
        dy = torch.randn(bsz, seqlen, k, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
        first = None
        for cfg in configs:
            if cfg is not None:
                tc.set_conv_config("bwd", cfg)
            try:
                fwd_bwd = functools.partial(_fwd_bwd, x, weight, bias, orders, dy)
                grads = fwd_bwd()
                first = first or grads
                err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(grads, first))
                for _ in range(3):
                    fwd_bwd()
                times = kernel_times(fwd_bwd, reps=10)
            finally:
                tc.set_conv_config("bwd", None)
            kern = {n[:60]: round(ms, 4) for n, ms, _ in times}
            total = sum(ms for _, ms, _ in times)
            fwd = sum(ms for n, ms, _ in times if "conv_fwd" in n)
            rows.append({"shape": name, "B": bsz, "D": dim, "L": seqlen, "K": k, "config": cfg,
                         "total_ms": total, "fwd_ms": fwd, "bwd_ms": total - fwd, "rel_err_vs_first": err,
                         "kernels_ms": kern})  # fmt: skip
            print(f"{tag:<6} {name:<18} {str(cfg):<14} f+b {total:7.4f} ms  fwd {fwd:7.4f}  bwd {total - fwd:7.4f}  "
                  f"err {err:.1e}", flush=True)  # fmt: skip
    out = os.path.join(os.environ.get("OUT", "."), f"conv_bwd_{tag}.json")
    with open(out, "w") as f:
        json.dump({**env_info(os.environ.get("GIT_COMMIT")), "tag": tag, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
