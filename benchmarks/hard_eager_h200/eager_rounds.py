"""Eager training steps of the hard single path next to its children, interleaved in rounds (GPU).

An eager step of these models waits on the host, whose speed drifts between runs by more than the effect measured
(the same child read 87 and 101 ms per step in two runs of ``supernet.bench`` on one machine). Here the three models
live side by side and take turns: each round times ``--steps`` steps of every model, and the ratios are formed per
round, then their median is taken.

    PYTHONPATH=. python benchmarks/hard_eager_h200/eager_rounds.py --rounds 8 --json OUT.json

Prints a table and writes JSON (device, versions, commit, every round's medians).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import timm
import torch
import triton

from supernet.bench import _build, _commit, make_train_step

MODELS = [
    ("child (supernet width)", "local_vim_tiny", {}),
    ("registered child", "local_vim_tiny", {"embed_dim": 192}),
    ("supernet[hard]", "local_vim_tiny_search", {"mix": "hard"}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    steps = {}
    for label, name, kwargs in MODELS:
        steps[label] = make_train_step(_build(name, kwargs, args.img_size), args.batch_size, args.img_size)
        for _ in range(3):
            steps[label]()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(args.rounds):
        row = {}
        for label, step in steps.items():
            times = []
            for _ in range(args.steps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            row[label] = statistics.median(times)
        rounds.append(row)
    med = {label: statistics.median(r[label] for r in rounds) for label in steps}
    hard = "supernet[hard]"
    ratios = {
        f"{hard} / {label}": statistics.median(r[hard] / r[label] for r in rounds) for label in steps if label != hard
    }
    print(f"{'model':<26}{'step ms (median of rounds)':>28}{'min':>8}{'max':>8}")
    for label in steps:
        vals = [r[label] for r in rounds]
        print(f"{label:<26}{med[label]:>28.2f}{min(vals):>8.2f}{max(vals):>8.2f}")
    for name, val in ratios.items():
        print(f"{name} (median of per-round ratios; target <= 1.1): {val:.3f}")
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timm": timm.__version__,
        "commit": _commit(),
        "mode": "eager",
        "cpus": sorted(os.sched_getaffinity(0)),  # the cores the host work may use (taskset)
        "batch_size": args.batch_size,
        "img_size": args.img_size,
        "steps_per_round": args.steps,
        "rounds": rounds,
        "median_step_ms": med,
        "ratios": ratios,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
