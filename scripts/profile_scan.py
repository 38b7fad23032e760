"""Where a fused scan's forward + backward spends its time: per-kernel CUDA times from torch.profiler.

    python scripts/profile_scan.py --shape 128 96 3136 1 4 --ku 1 --configs 4,32,1,32,32,1,1,1,1 4,16,1,32,32,1,1,1,1

Each ``--configs`` entry is a block-size tuple as in ``kernels.triton_scan.scan_config``; each config's gradients
are checked against the first config's (relative error below 1e-2, otherwise it is reported as failed and not
timed). Prints, per config, the do_bench median of forward + backward and the kernels that take the most CUDA time;
``--json`` saves the same. Orders (h, v, flips, windows) are built on the ``--hw`` token grid (default: the most
square factorisation of L).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from triton.testing import do_bench

from kernels.check_gpu import env_info
from kernels.ops import selective_scan
from kernels.testing import make_scan_inputs
from kernels.triton_scan import set_scan_config


def _grid(seqlen: int) -> tuple[int, int]:
    """The most square H×W with H·W = L, or = L - 1 (a class token) when that is squarer (197 → 14×14)."""

    def square(n: int) -> tuple[int, int]:
        h = int(n**0.5)
        while h * h > n:
            h -= 1
        while n % h:
            h -= 1
        return h, n // h

    return max(square(seqlen), square(seqlen - 1), key=min) if seqlen > 2 else (1, seqlen)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=5, metavar=("B", "D", "L", "N", "K"), required=True)
    p.add_argument("--ku", type=int, default=None, help="1 (shared u) or K (default K)")
    p.add_argument("--hw", type=int, nargs=2, default=None, help="token grid H W (H·W = L, or L - 1 with a cls token)")
    p.add_argument("--z", action="store_true", help="with the z gate")
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--json", default=None)
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    try:
        configs = [tuple(int(v) for v in spec.split(",")) for spec in args.configs]
    except ValueError:
        print(f"error: --configs takes comma-separated integers such as 4,32,1,32,32,1,1,1,1; got {args.configs}",
              file=sys.stderr)  # fmt: skip
        return 2
    batch, dim, seqlen, n, k = args.shape
    hw = tuple(args.hw) if args.hw else _grid(seqlen)
    if hw[0] * hw[1] not in (seqlen, seqlen - 1):
        print(f"error: --hw {hw[0]} {hw[1]} does not give L = {seqlen} tokens (H·W or H·W + 1)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: profile_scan needs a CUDA GPU", file=sys.stderr)
        return 2
    from kernels.bench import _leaves, kernel_times, real_orders

    torch.manual_seed(0)
    x = make_scan_inputs(batch, seqlen, k, dim, n, ku=args.ku or k, dtype=torch.bfloat16, device="cuda", has_z=args.z)
    names = ("h", "v", "h_flip", "v_flip", "w2", "w2_flip", "w7", "w7_flip")[:k]
    orders = real_orders(seqlen, hw, names).cuda()
    dy = torch.randn(batch, seqlen, k, dim, device="cuda", dtype=torch.bfloat16)
    leaves = _leaves(x)
    params = [t for t in leaves.values() if t is not None]

    def step():
        for t in params:
            t.grad = None
        selective_scan(**leaves, orders=orders, backend="triton").backward(dy)
        return [t.grad for t in params]

    report = {**env_info(args.commit), "shape": args.shape, "ku": args.ku or k, "z": args.z, "runs": []}
    first = None
    for cfg in configs:
        set_scan_config(n, seqlen, cfg)
        try:
            outs = [g.float() for g in step()]
        except Exception as err:  # noqa: BLE001  (a config that does not compile is reported, the others still run)
            print(f"{cfg}: failed: {err!r:.200}")
            report["runs"].append({"config": list(cfg), "error": repr(err)[:300]})
            continue
        first = first or outs
        err = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(outs, first))
        if not err < 1e-2:  # a config that disagrees with the first is reported, never timed as if it were valid
            print(f"{cfg}: differs from the first config (relative error {err:.3g})")
            report["runs"].append({"config": list(cfg), "error": f"relative error {err:.3g} vs the first config"})
            continue
        ms = do_bench(step, warmup=10, rep=50, return_mode="median")
        rows = kernel_times(step)[: args.top]
        kernels = [{"name": name[:90], "ms_per_step": ms, "calls": calls} for name, ms, calls in rows]
        print(f"{cfg}: fwd+bwd {ms:.3f} ms, rel. err vs first {err:.1e}")
        for r in kernels:
            print(f"    {r['ms_per_step']:8.3f} ms  x{r['calls']:<3} {r['name']}")
        report["runs"].append({"config": list(cfg), "fwd_bwd_ms": ms, "rel_err_vs_first": err, "kernels": kernels})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
