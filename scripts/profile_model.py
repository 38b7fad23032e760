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
import time

import torch
import yaml
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from kernels.check_gpu import env_info

GROUPS = [  # first match wins
    ("scan", r"_scan_|_sum_orders"),
    ("conv1d", r"_conv_|_conv1d|causal_conv"),
    ("matmul", r"gemm|gemv|sm90_xmma|cutlass|nvjet|matmul|ampere_|sm80_"),
    ("norm", r"norm|rms_|GammaBeta|_ln_"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("copies", r"copy|cat|index|gather|scatter|permute|transpose"),
    ("reductions", r"reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled|triton_"),
]


_WAITS = re.compile(r"cuda\w*Synchronize|cudaGraphLaunch|Activity Buffer Request|cudaStreamWaitEvent")


def group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name, re.IGNORECASE):
            return group
    return "other"


def launching_ops(prof, steps: int) -> list[tuple[str, str, float, float]]:
    """Device time per step of the kernels each op launched itself, keyed by (op name, input shapes), largest first.

    Needs a profile recorded with ``record_shapes=True``. An op's kernels are those of its own launches, so a
    composite op (``aten::einsum``) shows only what its children did not launch.
    """
    acc: dict[tuple[str, str], list[float]] = {}
    for evt in prof.events():
        if not evt.kernels:
            continue
        key = (evt.name, str(evt.input_shapes))
        slot = acc.setdefault(key, [0.0, 0.0])
        slot[0] += sum(k.duration for k in evt.kernels) / 1e3 / steps
        slot[1] += 1 / steps
    return sorted(((n, sh, ms, c) for (n, sh), (ms, c) in acc.items()), key=lambda r: -r[2])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model arguments, e.g. mix=hard (values read as YAML)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--mode", default="eager", help="supernet.bench's step mode: eager, compile, graph, compile+graph")
    p.add_argument("--json", default=None)
    p.add_argument("--commit", default=None)
    p.add_argument(
        "--by-op", action="store_true", help="also group device time by the launching op and its input shapes"
    )
    args = p.parse_args(argv)
    kwargs = {}
    for item in args.model_kwargs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"error: --model-kwargs takes KEY=VALUE items such as mix=hard, got {item!r}", file=sys.stderr)
            return 2
        kwargs[key] = yaml.safe_load(value)
    if not torch.cuda.is_available():
        print("error: profile_model needs a CUDA GPU", file=sys.stderr)
        return 2
    from supernet.bench import _build, make_train_step

    step = make_train_step(_build(args.model, kwargs, args.img_size), args.batch_size, args.img_size, args.mode)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=args.by_op) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    on_gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    kernels = [(e.key, e.self_device_time_total / 1e3 / args.steps, e.count // args.steps) for e in on_gpu]
    kernels = sorted([k for k in kernels if k[1] > 0], key=lambda k: -k[1])
    # Host work: CPU-side op events, less the waits (synchronize, graph launch) and the profiler's own events. Summed
    # over every thread (the autograd engine's too) and slowed by the profiler: compare ops with each other, not the
    # total with the step time.
    host = sorted(
        ((e.key, e.self_cpu_time_total / 1e3 / args.steps, e.count / args.steps) for e in events
         if e.device_type == DeviceType.CPU and not _WAITS.match(e.key)),
        key=lambda k: -k[1],
    )  # fmt: skip
    groups: dict[str, float] = {}
    for name, ms, _ in kernels:
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + ms
    total = sum(groups.values())
    host_ms = sum(ms for _, ms, _ in host)
    print(
        f"{args.model} [{args.mode}]: {wall_ms:.2f} ms per step unprofiled, {total:.2f} ms of kernels, "
        f"{host_ms:.2f} ms of profiled host op time, all threads (batch {args.batch_size}, {args.img_size}px)"
    )
    for g, ms in sorted(groups.items(), key=lambda x: -x[1]):
        print(f"  {g:<12} {ms:8.2f} ms  {100 * ms / total:5.1f} %")
    for name, ms, calls in kernels[: args.top]:
        print(f"    {ms:8.3f} ms  x{calls:<4} {name[:100]}")
    print("  host (self CPU time per step):")
    for name, ms, calls in host[: args.top]:
        print(f"    {ms:8.3f} ms  x{calls:<6g} {name[:100]}")
    by_op = launching_ops(prof, args.steps) if args.by_op else []
    if by_op:
        print("  device time by launching op (innermost op, input shapes):")
        for name, shapes, ms, calls in by_op[: args.top]:
            print(f"    {ms:8.3f} ms  x{calls:<5g} {name} {shapes[:110]}")
    if args.json:
        top = [{"name": n[:120], "ms_per_step": ms, "calls": c} for n, ms, c in kernels[: args.top]]
        top_host = [{"name": n[:120], "ms_per_step": ms, "calls": c} for n, ms, c in host[: args.top]]
        report = {**env_info(args.commit), "model": args.model, "model_kwargs": kwargs, "mode": args.mode,
                  "batch_size": args.batch_size, "img_size": args.img_size, "step_ms": wall_ms,
                  "kernel_ms_per_step": total, "host_op_ms_per_step": host_ms, "groups_ms": groups, "top": top,
                  "top_host": top_host,
                  "by_op": [{"op": n, "shapes": sh[:300], "ms_per_step": ms, "calls": c}
                            for n, sh, ms, c in by_op[: args.top]]}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
