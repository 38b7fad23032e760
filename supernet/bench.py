"""Training throughput of the model zoo next to timm references (GPU).

``python -m supernet.bench [--batch-size 128] [--img-size 224] [--json benchmarks/models_<gpu>.json]``

Per model: one training step = bf16 autocast forward + backward + AdamW step, timed with CUDA events over a few
steps after warm-up (median), on random data; peak memory from ``torch.cuda.max_memory_allocated`` over the whole
run (warm-up and graph capture included). ``--modes`` runs the steps eagerly, under ``torch.compile``, as one
captured CUDA graph per step, or both (see :func:`make_train_step`). Prints a table
and writes JSON with the device name, library versions and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import timm
import torch
import triton

import kernels
import supernet  # noqa: F401  (registers the entrypoints)
from supernet.compile import compile_model
from supernet.derive import derive_arch

DEFAULT_MODELS = [
    ("deit_tiny_patch16_224", {}),
    ("mambaout_femto", {}),
    ("vim_tiny", {}),
    ("vim_tiny", {"shuffle_max": 0.5}),  # SLWS: a shuffle drawn on the device for half of the layers on average
    ("local_fixed_vim_tiny", {}),
    ("local_vim_tiny", {}),  # the K=4 child of a (randomly initialised) supernet's arch, at the supernet's width
    ("local_vim_tiny", {"embed_dim": 192}),  # the same arch in the registered child (what retrain.train trains)
    ("local_vim_tiny", {"scan_recompute": True}),
    ("local_vim_tiny_search", {"mix": "softmax"}),  # recomputes its scan states (the search models' default)
    ("local_vim_tiny_search", {"mix": "softmax", "scan_recompute": False}),
    ("local_vim_tiny_search", {"mix": "hard"}),
    ("vmamba_tiny", {}),
]


def _commit() -> str:
    env = os.environ.get("GIT_COMMIT")
    if env:
        return env
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100': the first model-number-like word of the device name."""
    for word in name.split():
        if re.fullmatch(r"[A-Za-z]+\d{2,}[A-Za-z]*", word) and not word.upper().endswith("GB"):
            return word.lower()
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _build(name: str, kwargs: dict, img_size: int) -> torch.nn.Module:
    if name == "local_vim_tiny":
        # A child of the K=8 supernet, by default as wide as the supernet (so the ratio isolates the K cost); an
        # explicit embed_dim gives another width, e.g. the registered child's 192.
        search = timm.create_model("local_vim_tiny_search", img_size=img_size)
        arch = derive_arch(search)
        kwargs = {"embed_dim": search.embed_dim, **kwargs}
        return timm.create_model("local_vim_tiny", arch=arch, img_size=img_size, **kwargs)
    if name.startswith("mambaout"):  # timm's MambaOut is fully convolutional: it takes no img_size
        return timm.create_model(name, **kwargs)
    return timm.create_model(name, img_size=img_size, **kwargs)


MODES = ("eager", "compile", "reduce-overhead", "graph", "compile+graph")


def make_train_step(model: torch.nn.Module, batch_size: int, img_size: int, mode: str = "eager"):
    """One training step on random data on the current CUDA device: bf16 autocast forward + backward + AdamW.

    ``mode``: ``eager``; ``compile`` (``torch.compile`` of the model, inductor); ``reduce-overhead`` (the same with
    torch.compile's CUDA graphs of the forward and the backward: what ``retrain.train --compile reduce-overhead``
    runs); ``graph`` (the whole step, optimizer included, captured once in a CUDA graph and replayed: no per-kernel
    host work); ``compile+graph`` (both).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    graph = mode.endswith("graph")  # SLWS and Gumbel draws happen on the device: each replay draws afresh
    dev = torch.device("cuda")
    model = model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=graph)
    x = torch.randn(batch_size, 3, img_size, img_size, device=dev)
    y = torch.randint(0, model.num_classes, (batch_size,), device=dev)
    loss_fn = torch.nn.CrossEntropyLoss()
    fwd = model
    if mode.startswith("compile") or mode == "reduce-overhead":
        fwd = compile_model(model, "reduce-overhead" if mode == "reduce-overhead" else None)

    def step() -> None:
        # No autocast weight cache under a graph: cached casts would be captured once and go stale.
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graph):
            loss = loss_fn(fwd(x), y)
        loss.backward()
        opt.step()
        if not graph:
            opt.zero_grad(set_to_none=True)

    if not graph:
        return step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream (compiles kernels, allocates the Adam state)
        for _ in range(3):
            step()
            opt.zero_grad(set_to_none=True)
    torch.cuda.current_stream().wait_stream(side)
    # Grads are None here, so the captured backward allocates them in the graph's pool and each replay overwrites
    # them (no accumulation across replays): the recipe of torch.cuda.graphs' "whole network capture".
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    return g.replay


def time_train_step(
    model: torch.nn.Module, batch_size: int, img_size: int, steps: int = 10, warmup: int = 3, mode: str = "eager"
) -> dict:
    """Median seconds per training step and peak memory for one model on the current CUDA device."""
    # The peak covers warm-up and capture too: a CUDA graph's activations are allocated once, while it is captured.
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step = make_train_step(model, batch_size, img_size, mode)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    sec = statistics.median(times)
    return {
        "step_ms": sec * 1e3,
        "img_per_s": batch_size / sec,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def ratios_of(by: dict[str, dict]) -> dict[str, float]:
    """The issue's target ratios from one mode's rows keyed by model label."""
    ratios = {}
    if "deit_tiny_patch16_224" in by and "vim_tiny" in by:
        ratios["vim_tiny / deit_tiny img/s (target >= 0.75)"] = (
            by["vim_tiny"]["img_per_s"] / by["deit_tiny_patch16_224"]["img_per_s"]
        )
    child = by.get("local_vim_tiny")
    if child:
        for mix, target_t in (("softmax", 1.6), ("hard", 1.1)):
            sup = by.get(f"local_vim_tiny_search[mix={mix}]")
            if sup:
                ratios[f"supernet[{mix}] / child step time, defaults (target <= {target_t})"] = (
                    sup["step_ms"] / child["step_ms"]
                )
                ratios[f"supernet[{mix}] / child peak memory, defaults"] = sup["peak_mem_gib"] / child["peak_mem_gib"]
    # Against the registered child (embed_dim 192: the model a search hands to retrain.train).
    child = by.get("local_vim_tiny[embed_dim=192]")
    if child:
        for mix in ("softmax", "hard"):
            sup = by.get(f"local_vim_tiny_search[mix={mix}]")
            if sup:
                tag = f"supernet[{mix}] / registered child (embed_dim 192)"
                ratios[f"{tag} step time"] = sup["step_ms"] / child["step_ms"]
                ratios[f"{tag} peak memory"] = sup["peak_mem_gib"] / child["peak_mem_gib"]
    # The same comparison with both models recomputing, and with both keeping, their scan states.
    for tag, c_name, s_name in (
        ("both recompute", "local_vim_tiny[scan_recompute=True]", "local_vim_tiny_search[mix=softmax]"),
        ("both keep states", "local_vim_tiny", "local_vim_tiny_search[mix=softmax][scan_recompute=False]"),
    ):
        c, sup = by.get(c_name), by.get(s_name)
        if c and sup:
            ratios[f"supernet[softmax] / child step time, {tag}"] = sup["step_ms"] / c["step_ms"]
            ratios[f"supernet[softmax] / child peak memory, {tag}"] = sup["peak_mem_gib"] / c["peak_mem_gib"]
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--models", nargs="*", default=None, help="subset of model names")
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=MODES, help="how steps run (default eager)")
    parser.add_argument("--json", default=None, help="output JSON (default benchmarks/models_<gpu>.json)")
    parser.add_argument("--scan-sums", default="fixed", choices=kernels.CHANNEL_SUMS,
                        help="the scan backward's dB/dC channel sums (see kernels.set_channel_sums)")  # fmt: skip
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: supernet.bench needs a CUDA GPU", file=sys.stderr)
        return 2
    kernels.set_channel_sums(args.scan_sums)
    gpu = torch.cuda.get_device_name()
    rows = []
    for mode in args.modes:
        for name, kw in DEFAULT_MODELS:
            if args.models and name not in args.models:
                continue
            label = name + "".join(f"[{k}={v}]" for k, v in kw.items())
            try:
                model = _build(name, kw, args.img_size)
                res = time_train_step(model, args.batch_size, args.img_size, steps=args.steps, mode=mode)
            except Exception as e:  # noqa: BLE001  (a failing model is reported in the table, the others still run)
                res = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
                model = None
            rows.append({"model": label, "mode": mode, **res})
            print(json.dumps(rows[-1]), flush=True)
            del model
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    ratios = {}
    for mode in args.modes:
        tag = "" if mode == "eager" else f" [{mode}]"
        by = {r["model"]: r for r in rows if "error" not in r and r["mode"] == mode}
        ratios.update({k + tag: v for k, v in ratios_of(by).items()})
    print(f"\n{gpu}, batch {args.batch_size}, {args.img_size}px, bf16 autocast, fwd+bwd+AdamW")
    print(f"{'model':<48} {'mode':<14} {'img/s':>9} {'step ms':>9} {'peak GiB':>9} {'params M':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<48} {r['mode']:<14} {r['error']}")
        else:
            print(
                f"{r['model']:<48} {r['mode']:<14} {r['img_per_s']:>9.0f} {r['step_ms']:>9.2f} "
                f"{r['peak_mem_gib']:>9.2f} {r['params_m']:>9.2f}"
            )
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    out = Path(args.json or f"benchmarks/models_{gpu_slug(gpu)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "device": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timm": timm.__version__,
        "commit": _commit(),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "img_size": args.img_size,
        "modes": args.modes,
        "scan_sums": args.scan_sums,
        "rows": rows,
        "ratios": ratios,
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
