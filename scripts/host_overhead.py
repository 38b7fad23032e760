"""Host time per call of the project's ops, next to plain PyTorch ops, at sizes where the GPU work is negligible.

Eager training of these models is bound by the host: each op's Python, dispatcher and launch cost. This measures that
cost directly: N back-to-back calls at tiny shapes, one synchronisation at the end, wall time per call (median of
repeats). Prints a table and writes JSON (device, versions, commit).

    python scripts/host_overhead.py [--iters 200] [--json benchmarks/host_overhead_<gpu>.json] [--commit SHA]
    python scripts/host_overhead.py --no-ops --models vim_tiny local_vim_tiny_search --model-batch 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels  # noqa: E402
from kernels.check_gpu import env_info  # noqa: E402
from kernels.triton_merge import branch_merge_fwd  # noqa: E402
from supernet.bench import gpu_slug  # noqa: E402

_REPEATS = 5


def _time(fn, iters: int, repeats: int = _REPEATS) -> float:
    """Median over repeats of the wall time per call, in µs (one synchronisation per repeat)."""
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) / iters * 1e6)
    return statistics.median(samples)


def _profile(fn, iters: int, top: int) -> None:
    """Python-level breakdown of one case: cProfile over ``iters`` calls, the top functions by own time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def _cases(dev: torch.device) -> dict:
    """name -> a callable doing one call (fwd, or fwd+bwd) at a tiny size."""
    bsz, seqlen, k, dim, n, hidden = 2, 16, 4, 32, 16, 4
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, grad=True, scale=1.0):
        return (scale * torch.randn(*shape, device=dev, generator=gen)).requires_grad_(grad)

    a, b = rnd(64, grad=False), rnd(64, grad=False)
    y = rnd(bsz, seqlen, k, dim)
    w = torch.softmax(rnd(k, grad=False), 0).requires_grad_()
    params = [rnd(dim), rnd(dim), rnd(hidden, dim), rnd(hidden), rnd(dim, hidden), rnd(dim)]
    dout = rnd(bsz, seqlen, dim, grad=False)
    u, delta = rnd(bsz, seqlen, 1, dim), rnd(bsz, seqlen, k, dim, scale=0.1)
    A = (-torch.rand(k, dim, n, device=dev)).requires_grad_()
    Bm, Cm = rnd(bsz, seqlen, k, n), rnd(bsz, seqlen, k, n)
    orders = torch.stack([torch.randperm(seqlen, device=dev) for _ in range(k)])
    dy = rnd(bsz, seqlen, k, dim, grad=False)
    cw, cb = rnd(k, dim, 4), rnd(k, dim)
    xn = rnd(bsz, seqlen, dim)

    xh, dout_h = xn.detach().bfloat16().requires_grad_(), dout.bfloat16()

    def add_norm(backend: str):
        # A block's residual add + norm under autocast: bf16 mixer output onto the fp32 residual, y in bf16.
        out, res = kernels.add_rms_norm(xh, xn, params[0], 1e-5, torch.bfloat16, backend=backend)
        torch.autograd.backward([out, res], [dout_h, dout])

    def torch_gated_merge():
        # The PyTorch composition the fused op replaced (LayerNorm, mean, MLP, gate, weighted sum), forward+backward.
        g = F.layer_norm(y, (dim,), params[0], params[1]).mean(1, keepdim=True)
        g = torch.sigmoid(F.linear(F.gelu(F.linear(g, params[2], params[3])), params[4], params[5]))
        ((y * g) * w.view(1, 1, -1, 1)).sum(2).backward(dout)

    return {
        "torch add (no grad)": lambda: torch.add(a, b),
        "triton launch: merge kernel (no grad)": lambda: branch_merge_fwd(y.detach(), w.detach()),
        "registered merge op (no grad)": lambda: torch.ops.scan_nas.branch_merge(y.detach(), w.detach()),
        "branch_merge fwd+bwd": lambda: kernels.branch_merge(y, w, backend="triton").backward(dout),
        "branch_attn_merge fwd+bwd (fused)": lambda: kernels.branch_attn_merge(
            y, w, *params, backend="triton"
        ).backward(dout),
        "gated merge fwd+bwd (PyTorch ops)": torch_gated_merge,
        "selective_scan fwd+bwd": lambda: kernels.selective_scan(
            u, delta, A, Bm, Cm, orders=orders, delta_softplus=True, backend="triton"
        ).backward(dy),
        "causal_conv1d fwd+bwd": lambda: kernels.causal_conv1d(u, cw, cb, orders=orders, backend="triton").backward(dy),
        "rms_norm fwd+bwd (Triton backward)": lambda: kernels.rms_norm(xn, params[0], backend="triton").backward(dout),
        "rms_norm fwd+bwd (PyTorch)": lambda: F.rms_norm(xn, (dim,), params[0]).backward(dout),
        "add_rms_norm fwd+bwd (Triton)": lambda: add_norm("triton"),
        "add_rms_norm fwd+bwd (PyTorch ops)": lambda: add_norm("ref"),
    }


def _model_cases(dev: torch.device, names: list[str], bsz: int) -> dict:
    """name -> one training step (forward, backward, AdamW) of a registered model under bf16 autocast, at a batch
    small enough that the GPU work is negligible: the step's wall time is then the host's."""
    import timm

    import supernet  # noqa: F401  (registers the entrypoints)

    cases = {}
    for name in names:
        model = timm.create_model(name).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(bsz, 3, 224, 224, device=dev)
        target = torch.randint(0, 1000, (bsz,), device=dev)

        def step(model=model, opt=opt, x=x, target=target):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        cases[f"{name} train step, batch {bsz}"] = step
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--json", default=None, help="output JSON (default benchmarks/host_overhead_<gpu>.json)")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--cprofile", type=int, default=0, metavar="N", help="also print each case's top N functions")
    parser.add_argument("--models", nargs="*", default=[], help="also time a training step of these models (µs)")
    parser.add_argument("--model-batch", type=int, default=2, help="batch size of the model steps (default 2)")
    parser.add_argument("--model-iters", type=int, default=20, help="steps per repeat of the model cases")
    parser.add_argument("--ops", action=argparse.BooleanOptionalAction, default=True, help="time the op cases")
    args = parser.parse_args(argv)
    from retrain.train import _is_zoo_model  # names checked up front, with the trainers' one-line error

    for name in args.models:
        try:
            _is_zoo_model(name)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
    if not torch.cuda.is_available():
        raise SystemExit("error: host_overhead needs a CUDA GPU (the Triton launches are what it times)")
    dev = torch.device("cuda")
    rows = []
    cases = [(name, fn, args.iters) for name, fn in (_cases(dev) if args.ops else {}).items()]
    cases += [(name, fn, args.model_iters) for name, fn in _model_cases(dev, args.models, args.model_batch).items()]
    for name, fn, iters in cases:
        us = _time(fn, iters)
        rows.append({"case": name, "us_per_call": round(us, 1), "calls_per_repeat": iters})
        print(f"{name:42s} {us:9.1f} us", flush=True)
        if args.cprofile:
            _profile(fn, iters, args.cprofile)
    info = env_info(args.commit)
    kind = "" if args.ops else "_models"  # a models-only run does not replace the op table
    path = args.json or f"benchmarks/host_overhead{kind}_{gpu_slug(info['device'])}.json"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    settings = dict(iters=args.iters, model_iters=args.model_iters, model_batch=args.model_batch, repeats=_REPEATS)
    with open(path, "w") as f:
        json.dump({**info, **settings, "rows": rows}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
