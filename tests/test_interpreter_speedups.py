"""The interpreter's speed-ups (tests/interpreter_speedups.py, installed by conftest) against Triton's own code paths:
the kernels' scan combine and a NaN-propagating max, forward and reverse, along either axis of odd-sized blocks, and a
jit helper called inside the kernel, bit for bit, with the folds in use; combines the folds cannot stand in for (a
branch on a value, another dtype or number of results) giving what the interpreter gives, its error included; the
language patched once per launch, restored after it, and patched for a launch after a helper patched more."""

from __future__ import annotations

import os
import sys
import textwrap

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
    walks = []
    for name in ("generic_scan", "generic_reduce"):
        original = interpreter_speedups.ORIGINAL[name]
        monkeypatch.setitem(interpreter_speedups.ORIGINAL, name, lambda *a, f=original: walks.append(1) or f(*a))
    ours = _run(a, b, axis, reverse)
    assert not walks  # the folds ran, not a fall-back to the walk
    monkeypatch.undo()
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


@triton.jit
def _branching_max(a, b):  # a Python branch on a value: legal on the scalars of a compiled combine
    r = b
    if a > b:
        r = a
    return r


@triton.jit
def _to_float(a, b):  # int32 in, fp32 out: the walk converts through Python scalars (and raises on NaN)
    return a.to(tl.float32) / b.to(tl.float32)


@triton.jit
def _one_of_two(a, i, b, j):
    return a + b


@triton.jit
def _odd_combines_kernel(x_ptr, n_ptr, y_ptr, R: tl.constexpr, C: tl.constexpr, WHICH: tl.constexpr):
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    x = tl.load(x_ptr + offs)
    if WHICH == 0:
        tl.store(y_ptr + offs, tl.associative_scan(x, 0, _branching_max))
    elif WHICH == 1:
        tl.store(y_ptr + tl.arange(0, R)[:, None], tl.reduce(x, 1, _branching_max, keep_dims=True))
    elif WHICH == 2:
        tl.store(y_ptr + offs, tl.associative_scan(tl.load(n_ptr + offs), 0, _to_float).to(tl.float32))
    else:
        y, _ = tl.associative_scan((x, tl.load(n_ptr + offs)), 0, _one_of_two)
        tl.store(y_ptr + offs, y)


@pytest.mark.parametrize("which", ["branch-scan", "branch-reduce", "int-to-float", "one-of-two-results"])
def test_combines_the_folds_cannot_stand_in_for_give_what_the_interpreter_gives(monkeypatch, which):
    from triton.runtime import interpreter

    def run():
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(8, 4, generator=gen)
        n = torch.randint(-3, 4, (8, 4), generator=gen, dtype=torch.int32)
        y = torch.zeros(8, 4)
        try:
            _odd_combines_kernel[(1,)](x, n, y, 8, 4, ["branch-scan", "branch-reduce", "int-to-float",
                                                      "one-of-two-results"].index(which))  # fmt: skip
        except Exception as e:  # the walk's own error, e.g. NaN to an integer or a missing result
            return type(e).__name__, str(e)
        return y

    ours = run()
    monkeypatch.setattr(interpreter.ScanOps, "generic_scan", interpreter_speedups.ORIGINAL["generic_scan"])
    monkeypatch.setattr(interpreter.ReduceOps, "generic_reduce", interpreter_speedups.ORIGINAL["generic_reduce"])
    theirs = run()
    if isinstance(theirs, tuple):
        assert ours == theirs
    else:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)


def test_launches_after_a_helper_patched_another_language_module(tmp_path, monkeypatch):
    """Helpers whose modules see other language modules than their kernel's: a kernel that sees the language only as
    ``triton.language.core`` calling a helper of an ordinary module, and the reverse. Such a call patches a module
    that no launch restores; every later launch still patches for itself and runs."""
    (tmp_path / "speedups_core_only.py").write_text(
        textwrap.dedent("""
        import triton
        import triton.language.core as tl

        from kernels.triton_scan import _log2


        @triton.jit
        def core_helper(x):
            return x * 3.0


        @triton.jit
        def core_kernel(x_ptr, y_ptr, N: tl.constexpr):
            offs = tl.arange(0, N)
            tl.store(y_ptr + offs, _log2(tl.load(x_ptr + offs)))


        @triton.jit
        def core_plain_kernel(x_ptr, y_ptr, N: tl.constexpr):
            offs = tl.arange(0, N)
            tl.store(y_ptr + offs, tl.load(x_ptr + offs) + 1.0)
    """)
    )
    (tmp_path / "speedups_plain.py").write_text(
        textwrap.dedent("""
        import triton
        import triton.language as tl

        from speedups_core_only import core_helper


        @triton.jit
        def plain_kernel(x_ptr, y_ptr, N: tl.constexpr):
            offs = tl.arange(0, N)
            tl.store(y_ptr + offs, core_helper(tl.load(x_ptr + offs)))
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("speedups_core_only", "speedups_plain"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import speedups_core_only
    import speedups_plain

    x = torch.rand(4) + 0.5
    y = torch.empty(4)
    speedups_core_only.core_kernel[(1,)](x, y, 4)
    torch.testing.assert_close(y, torch.log2(x))
    a = torch.rand(8, 4)
    p, s, _, _ = _run(a, torch.randn(8, 4), 0, False)
    torch.testing.assert_close(p - torch.log2(a + 1.0), torch.cumprod(a, 0), rtol=1e-5, atol=1e-5)
    speedups_plain.plain_kernel[(1,)](x, y, 4)
    torch.testing.assert_close(y, x * 3.0)
    speedups_core_only.core_plain_kernel[(1,)](x, y, 4)
    torch.testing.assert_close(y, x + 1.0)
