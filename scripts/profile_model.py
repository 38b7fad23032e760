"""Where a model's training step spends its GPU time: CUDA kernels from torch.profiler, grouped by kind.

``python scripts/profile_model.py --model vim_tiny [--batch-size 128] [--img-size 224] [--json F]``

The step is ``supernet.bench``'s (bf16 autocast forward + backward + AdamW on random data). Prints the time per step
of each group (scan, conv1d, matmul, normalisation, elementwise, reductions, copies, optimizer) and the top
kernels; writes JSON with the device, versions and commit.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from kernels.check_gpu import env_info

GROUPS = [  # first match wins
    ("scan", r"_scan_|_sum_orders"),
    ("conv1d", r"_conv_|_conv1d|causal_conv"),
    ("matmul", r"gemm|gemv|sm90_xmma|cutlass|nvjet|matmul|ampere_|sm80_"),
    ("norm", r"norm|rms_|GammaBeta"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("copies", r"copy|cat|index|gather|scatter|permute|transpose"),
    ("reductions", r"reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled|triton_"),
]


def group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name, re.IGNORECASE):
            return group
    return "other"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--json", default=None)
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: profile_model needs a CUDA GPU", file=sys.stderr)
        return 2
    from supernet.bench import _build, make_train_step

    step = make_train_step(_build(args.model, {}, args.img_size), args.batch_size, args.img_size)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    kernels = [(e.key, e.device_time_total / 1e3 / args.steps, e.count // args.steps) for e in prof.key_averages()]
    kernels = sorted([k for k in kernels if k[1] > 0], key=lambda k: -k[1])
    groups: dict[str, float] = {}
    for name, ms, _ in kernels:
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + ms
    total = sum(groups.values())
    print(f"{args.model}: {total:.2f} ms of kernels per step (batch {args.batch_size}, {args.img_size}px)")
    for g, ms in sorted(groups.items(), key=lambda x: -x[1]):
        print(f"  {g:<12} {ms:8.2f} ms  {100 * ms / total:5.1f} %")
    for name, ms, calls in kernels[: args.top]:
        print(f"    {ms:8.3f} ms  x{calls:<4} {name[:100]}")
    if args.json:
        top = [{"name": n[:120], "ms_per_step": ms, "calls": c} for n, ms, c in kernels[: args.top]]
        report = {**env_info(args.commit), "model": args.model, "batch_size": args.batch_size,
                  "img_size": args.img_size, "kernel_ms_per_step": total, "groups_ms": groups, "top": top}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
