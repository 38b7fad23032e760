"""Shared helpers for checking the scan backends against the reference: inputs, tolerances, comparisons.

Used by tests/kernels (CPU, Triton interpreter) and by ``kernels/check_gpu.py`` (the full grid on a GPU).
Inputs follow mamba-ssm's test recipe: A = -0.5·rand, B, C, D, z, u = randn, delta = 0.5·rand,
delta_bias = 0.5·rand.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = [
    "GRAD_NAMES",
    "TOLERANCES",
    "compare",
    "grad_tolerance",
    "make_orders",
    "make_scan_inputs",
    "poisoned_empty",
    "scan_with_grads",
]

# mamba-ssm's table: dtype -> (rtol, atol) for the output; gradients scale it per name (grad_tolerance).
TOLERANCES = {
    torch.float32: (6e-4, 2e-3),
    torch.float16: (3e-3, 5e-3),
    torch.bfloat16: (3e-2, 5e-2),
}
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def grad_tolerance(name: str, dtype: torch.dtype) -> tuple[float, float]:
    """mamba-ssm's per-gradient tolerances for (rtol, atol).

    du ×2; ddelta ×5 rtol and ×10 atol; dB, dC (variable in time) as the output; dA (rtol_w, 5·atol_w);
    dD, dz, ddelta_bias (rtol_w, atol_w), with rtol_w = max(1e-3, rtol) and atol_w = max(1e-3, atol).
    """
    rtol, atol = TOLERANCES[dtype]
    rtol_w, atol_w = max(1e-3, rtol), max(1e-3, atol)
    table = {
        "u": (2 * rtol, 2 * atol),
        "delta": (5 * rtol, 10 * atol),
        "A": (rtol_w, 5 * atol_w),
        "B": (rtol, atol),
        "C": (rtol, atol),
    }
    return table.get(name, (rtol_w, atol_w))


def make_scan_inputs(
    batch: int,
    seqlen: int,
    k: int,
    dim: int,
    dstate: int,
    ku: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    has_D: bool = True,
    has_z: bool = True,
    has_bias: bool = True,
    kz: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor | None]:
    """Random scan inputs in the token-major layout (A, D, delta_bias fp32; the rest in ``dtype``)."""
    ku = k if ku is None else ku
    kz = k if kz is None else kz
    g = generator

    def rnd(*shape, kind="randn", dt=dtype):
        fn = torch.randn if kind == "randn" else torch.rand
        return fn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dt)

    return {
        "u": rnd(batch, seqlen, ku, dim),
        "delta": 0.5 * rnd(batch, seqlen, k, dim, kind="rand"),
        "A": -0.5 * rnd(k, dim, dstate, kind="rand", dt=torch.float32),
        "B": rnd(batch, seqlen, k, dstate),
        "C": rnd(batch, seqlen, k, dstate),
        "D": rnd(k, dim, dt=torch.float32) if has_D else None,
        "z": rnd(batch, seqlen, kz, dim) if has_z else None,
        "delta_bias": 0.5 * rnd(k, dim, kind="rand", dt=torch.float32) if has_bias else None,
    }


def scan_with_grads(fn, inputs: dict, dy: torch.Tensor | None = None, **kwargs):
    """Run ``fn(**twins, **kwargs)`` on fresh leaf twins of ``inputs``; backprop ``dy`` (random when None).

    Returns:
        (y, grads by name, dy).
    """
    twins = {n: (t.detach().clone().requires_grad_() if t is not None else None) for n, t in inputs.items()}
    y = fn(**twins, **kwargs)
    if dy is None:
        dy = torch.randn(y.shape, dtype=torch.float32, device=y.device).to(y.dtype)
    y.backward(dy)
    grads = {n: t.grad for n, t in twins.items() if t is not None}
    return y, grads, dy


def compare(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> dict:
    """allclose-style check (NaN always fails); returns a record with the worst error and whether it passed."""
    got32, want32 = got.detach().float(), want.detach().float()
    finite = bool(torch.isfinite(got32).all())
    err = (got32 - want32).abs()
    bound = atol + rtol * want32.abs()
    ok = finite and bool((err <= bound).all())
    return {
        "name": name,
        "ok": ok,
        "finite": finite,
        "max_abs_err": float(err.max()) if err.numel() else 0.0,
        "max_err_over_bound": float((err / bound).max()) if err.numel() else 0.0,
        "rtol": rtol,
        "atol": atol,
    }


ORDER_NAMES = ("h", "v_flip", "w2", "w3_flip", "zh", "wv3", "h_flip", "v", "w7_flip")


def make_orders(seqlen: int, hw: tuple[int, int], k: int, names: tuple[str, ...] = ORDER_NAMES) -> torch.Tensor:
    """K real orders (from the registry) on an H×W grid, as a (K, L) LongTensor.

    When L = H·W + 1, a class token (index H·W) is put in the middle of every order, as Vim places it.
    """
    from search_spaces.orders import scan_order

    rows = []
    for i in range(k):
        o = scan_order(names[i % len(names)], *hw)
        if seqlen == o.numel() + 1:
            mid = o.numel() // 2
            o = torch.cat([o[:mid], torch.tensor([o.numel()]), o[mid:]])
        elif seqlen != o.numel():
            raise ValueError(f"seqlen: expected {o.numel()} or {o.numel() + 1} for a {hw} grid, got {seqlen}")
        rows.append(o)
    return torch.stack(rows)


@contextlib.contextmanager
def poisoned_empty():
    """Make ``torch.empty`` return NaN-filled (floats) or -1-filled (ints) tensors, so unwritten outputs show."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real
