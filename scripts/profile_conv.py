"""Block sizes of the per-order causal conv1d's kernels: forward and forward + backward time per config (GPU).

    python scripts/profile_conv.py --shape 128 384 197 2 --configs 32,128,4 16,128,4 [--json F]

``--shape B D L K``: a shared input (Kx = 1, as the mixer calls it: a slice of ``in_proj``'s output) scanned along K
orders of the token grid, width 4, bias, SiLU, bf16. Each ``--configs`` entry (BLOCK_T, BLOCK_D, warps) is applied to
the forward and to the backward kernels; an optional 4th number, SPAN (step blocks per program of the first backward
kernel, 0 for all), to the backward alone. Each config's output and gradients are checked against the first config's.
Prints a table of do_bench medians (wall clock, host launch work included) and each config's device time per kernel
(torch.profiler, per forward + backward), and writes JSON with the device, versions and commit.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from triton.testing import do_bench

from kernels.bench import kernel_times
from kernels.check_gpu import env_info
from kernels.ops import causal_conv1d
from kernels.testing import make_orders
from kernels.triton_conv import set_conv_config


def _time_configs(configs, x, weight, bias, orders, dy) -> list[dict]:
    rows, first = [], None
    for cfg in configs:
        set_conv_config("fwd", cfg[:3])
        set_conv_config("bwd", cfg)
        xl = x.detach().requires_grad_()  # still the strided slice (clone() would make it contiguous)

        def fwd(xl=xl):
            return causal_conv1d(xl, weight, bias, orders=orders, backend="triton")

        def fwd_bwd(xl=xl):
            torch.autograd.grad(fwd(xl), (xl, weight, bias), dy)

        out = fwd()
        grads = torch.autograd.grad(out, (xl, weight, bias), dy)
        if first is None:
            first = (out, *grads)
        err = max(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
                  for a, b in zip((out, *grads), first))  # fmt: skip
        row = {"config": list(cfg), "max_rel_err_vs_first": err}
        if err < 1e-2:
            row["fwd_ms"] = do_bench(fwd, warmup=10, rep=50, return_mode="median")
            row["fwd_bwd_ms"] = do_bench(fwd_bwd, warmup=10, rep=50, return_mode="median")
            # Device time per kernel (the wall-clock medians above include the host's launch work)
            kernels: dict[str, float] = {}
            for name, ms, _ in kernel_times(fwd_bwd):  # names cut to 60 characters: kernels that share them are summed
                kernels[name[:60]] = kernels.get(name[:60], 0.0) + ms
            row["kernels_ms"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1]))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=4, metavar=("B", "D", "L", "K"), required=True)
    p.add_argument("--hw", type=int, nargs=2, default=(14, 14), help="token grid H W (H·W = L or L - 1)")
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--json", default=None)
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    try:
        configs = [tuple(int(v) for v in spec.split(",")) for spec in args.configs]
        for cfg in configs:
            set_conv_config("bwd", cfg)  # checks the length, the powers of two and SPAN now, not mid-run
        set_conv_config("bwd", None)
    except ValueError as err:
        print(f"error: --configs takes BLOCK_T,BLOCK_D,warps[,SPAN] such as 32,128,4 or 16,128,4,4 ({err})",
              file=sys.stderr)  # fmt: skip
        return 2
    if not torch.cuda.is_available():
        print("error: profile_conv needs a CUDA GPU", file=sys.stderr)
        return 2
    batch, dim, seqlen, k = args.shape
    height, width = args.hw
    names = ("h", "h_flip", "v", "v_flip", "w2", "w2_flip", "w7", "w7_flip")[:k]
    orders = make_orders(seqlen, (height, width), k, names).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    xz = torch.randn(batch, seqlen, 2 * dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    x = xz[..., :dim].unsqueeze(2)  # a strided slice, as in the mixer
    weight = torch.randn(k, dim, 4, device="cuda", generator=gen).requires_grad_()
    bias = torch.randn(k, dim, device="cuda", generator=gen).requires_grad_()
    dy = torch.randn(batch, seqlen, k, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    try:
        rows = _time_configs(configs, x, weight, bias, orders, dy)
    finally:
        set_conv_config("fwd", None)
        set_conv_config("bwd", None)
    print(f"conv1d B {batch} D {dim} L {seqlen} K {k} (Kx 1, W 4, bf16), {torch.cuda.get_device_name()}")
    print(f"{'config':<14} {'fwd ms':>8} {'f+b ms':>8} {'rel err':>9}")
    for r in rows:
        cfg = ",".join(map(str, r["config"]))
        if "fwd_ms" in r:
            print(f"{cfg:<14} {r['fwd_ms']:>8.3f} {r['fwd_bwd_ms']:>8.3f} {r['max_rel_err_vs_first']:>9.1e}")
            for name, ms in list(r["kernels_ms"].items())[:4]:
                print(f"    {ms:8.3f} ms  {name}")
        else:
            print(f"{cfg:<14} {'failed':>8} {'':>8} {r['max_rel_err_vs_first']:>9.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**env_info(args.commit), "shape": args.shape, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
