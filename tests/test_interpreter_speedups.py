"""The interpreter's speed-ups (tests/interpreter_speedups.py, installed by conftest) against Triton's own code paths:
the kernels' scan combine and a NaN-propagating max, forward and reverse, along either axis of odd-sized blocks, and a
jit helper called inside the kernel, bit for bit; and the language patched once per launch, and restored after it."""

from __future__ import annotations

import os

import interpreter_speedups
import pytest
import torch
import triton
import triton.language as tl

from kernels.triton_scan import _affine_combine, _log2
from kernels.triton_scan_nd import _max_nan

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the folds replace the CPU interpreter's; compiled runs skip"
)


@triton.jit
def _scan_reduce_kernel(a_ptr, b_ptr, p_ptr, s_ptr, m_ptr, mall_ptr, R: tl.constexpr, C: tl.constexpr,
                        AXIS: tl.constexpr, REVERSE: tl.constexpr):  # fmt: skip
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    a = tl.load(a_ptr + offs)
    b = tl.load(b_ptr + offs)
    p, s = tl.associative_scan((a, b), axis=AXIS, combine_fn=_affine_combine, reverse=REVERSE)
    tl.store(p_ptr + offs, p + _log2(a + 1.0))  # a jit helper's call
    tl.store(s_ptr + offs, s)
    m = tl.reduce(b, AXIS, _max_nan)
    if AXIS == 0:
        tl.store(m_ptr + tl.arange(0, C), m)
    else:
        tl.store(m_ptr + tl.arange(0, R), m)
    tl.store(mall_ptr, tl.reduce(b, None, _max_nan))


def _run(a, b, axis, reverse):
    rows, cols = a.shape
    p, s = torch.empty_like(a), torch.empty_like(a)
    m = torch.empty(cols if axis == 0 else rows)
    mall = torch.empty(1)
    _scan_reduce_kernel[(1,)](a, b, p, s, m, mall, rows, cols, axis, reverse)
    return p, s, m, mall


def test_installed():
    """The suite runs with the speed-ups in (a Triton whose interpreter no longer has these hooks fails here)."""
    assert interpreter_speedups.install()


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("reverse", [False, True])
def test_folds_equal_the_interpreters_own_bit_for_bit(monkeypatch, axis, reverse):
    from triton.runtime import interpreter

    gen = torch.Generator().manual_seed(7 + 2 * axis + reverse)
    a = torch.rand(16, 8, generator=gen) * 1.5  # decays, some above 1 so rounding grows along the scan
    b = torch.randn(16, 8, generator=gen)
    b[3, 5] = float("nan")
    ours = _run(a, b, axis, reverse)
    monkeypatch.setattr(interpreter.ScanOps, "generic_scan", interpreter_speedups.ORIGINAL["generic_scan"])
    monkeypatch.setattr(interpreter.ReduceOps, "generic_reduce", interpreter_speedups.ORIGINAL["generic_reduce"])
    monkeypatch.setattr(interpreter, "_patch_lang", interpreter_speedups.ORIGINAL["_patch_lang"])
    theirs = _run(a, b, axis, reverse)
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    # and the scan is the sequential composition it stands for
    p, s = ours[:2]
    p = p - torch.log2(a + 1.0)
    ref_p, ref_s = a.clone(), b.clone()
    steps = range(a.shape[axis] - 2, -1, -1) if reverse else range(1, a.shape[axis])
    for i in steps:
        prev, cur = (i + 1, i) if reverse else (i - 1, i)
        take = (lambda t, j: t[j]) if axis == 0 else (lambda t, j: t[:, j])
        take(ref_p, cur).copy_(take(ref_p, prev) * take(a, cur))
        take(ref_s, cur).copy_(take(ref_s, prev) * take(a, cur) + take(b, cur))
    torch.testing.assert_close(p, ref_p, equal_nan=True, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, ref_s, equal_nan=True)


def test_the_language_is_patched_once_per_launch_and_restored(monkeypatch):
    calls = []
    original = interpreter_speedups.ORIGINAL["_patch_lang"]
    monkeypatch.setitem(interpreter_speedups.ORIGINAL, "_patch_lang", lambda fn: calls.append(fn) or original(fn))
    assert tl.core.is_builtin(tl.load)
    a = torch.rand(8, 4)
    _run(a, torch.randn(8, 4), 0, False)
    assert len(calls) == 1  # the launch; the _log2 helper's call found the language patched
    assert tl.core.is_builtin(tl.load)  # and the launch restored it
