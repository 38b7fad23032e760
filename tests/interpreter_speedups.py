"""Two speed-ups of Triton's CPU interpreter for the test suite; what the kernels compute is unchanged.

**Folds a slice at a time.** Under ``TRITON_INTERPRET=1`` a ``tl.associative_scan`` or ``tl.reduce`` whose combine
function is not one of Triton's own (sum, prod, min, max) falls back to ``ScanOps.generic_scan`` /
``ReduceOps.generic_reduce``, which walk the block one element at a time: a Python call of the combine function per
element, most of the interpreted scan kernels' time. The versions here do the same left fold along the axis (element
0, then combine(acc, element i) for i = 1, 2, ..., the accumulator stored in the input's dtype after every step) but
call the combine function once per position along the axis, on the whole slice across the other axes: each element
sees the same operations in the same order. A combine the fold cannot stand in for raises inside it, and the
interpreter's own walk runs instead, giving its result or its error: one that branches on a value (the walk would
branch on one element, the fold on a slice), or returns another number of results or other dtypes than its inputs.

**The language patched once per launch.** A launch patches ``triton.language`` with the interpreter's versions of its
builtins and restores it when the grid is done; every call of a ``@triton.jit`` helper inside the kernel then patches
it again (``inspect.getmembers`` over the modules, about a millisecond per call, and a scope that is never restored),
finding every builtin already replaced. Here a call whose language modules were patched since the launch began (by the
launch or an earlier helper) gets an empty scope instead.

``tests/test_interpreter_speedups.py`` runs kernels through both versions of each and compares them bit for bit, and
checks that a launch patches once and restores what it patched. ``install()`` changes nothing when the
interpreter is not the one these were written against.
"""

from __future__ import annotations

import contextlib
import inspect

import numpy as np

ORIGINAL: dict[str, object] = {}


class _Fallback(Exception):
    """The fold cannot stand in for the element-wise walk here; the interpreter's own path runs instead."""


def _store(out: np.ndarray, idx: tuple, value) -> None:
    """``out[idx] = value``, cast to ``out``'s dtype as the element-wise walk's stores are (a 1-element result fills a
    0-d slot)."""
    value = np.asarray(value)
    if np.ndim(out[idx]) == 0:
        value = value.reshape(())
    out[idx] = value


@contextlib.contextmanager
def _elementwise_only():
    """A combine that branches on a value (``if a > b:``, ``int(x)``) sees one element in the walk and a whole slice
    in the fold, where the interpreter would answer for the first element only: make that a ``_Fallback``."""
    import triton.language as tl

    cls = tl.core.tensor
    saved = {name: cls.__dict__.get(name) for name in ("__bool__", "__index__")}

    def guard(name):
        def method(self):
            if self.handle.data.size != 1:
                raise _Fallback(name)
            return saved[name](self)

        return method

    for name, original in saved.items():
        if original is not None:
            setattr(cls, name, guard(name))
    try:
        yield
    finally:
        for name, original in saved.items():
            if original is not None:
                setattr(cls, name, original)


def _fold(op, inputs, axis: int, outputs: list, scan: bool) -> None:
    """The left fold along ``axis``: a scan stores step i at position i, a reduction overwrites its one slot; either
    way the accumulator is read back from the store, in the inputs' dtypes. Raises ``_Fallback`` where the walk would
    differ: a combine that branches on a value, or returns another number of values or other dtypes (the walk's
    stores then convert through Python scalars, or raise)."""
    import triton.language as tl

    data = [arg.handle.data for arg in inputs]
    dtypes = [arg.dtype for arg in inputs]
    along = (slice(None),) * axis
    acc = ()
    for i in range(data[0].shape[axis]):
        if i == 0:
            values = [d[(*along, 0)] for d in data]
        else:
            cur = tuple(op.to_tensor(d[(*along, i)], t) for d, t in zip(data, dtypes))
            ret = op.combine_fn.fn(*acc, *cur)
            ret = ret if isinstance(ret, tuple) else (ret,)
            if len(ret) != len(inputs) or any(
                not isinstance(r, tl.core.tensor) or r.dtype != t for r, t in zip(ret, dtypes)
            ):
                raise _Fallback("combine result")
            values = [r.handle.data for r in ret]
        idx = (*along, i) if scan else (...,)
        for out, v in zip(outputs, values):
            _store(out, idx, v)
        acc = tuple(op.to_tensor(out[idx], t) for out, t in zip(outputs, dtypes))


def _or_original(name: str):
    def decorate(fold_op):
        def op(self, input):
            try:
                with _elementwise_only():
                    return fold_op(self, input)
            except Exception:  # the walk gives what the interpreter gives: its result, or its error
                return ORIGINAL[name](self, input)

        return op

    return decorate


@_or_original("generic_scan")
def generic_scan(self, input):
    outputs = [np.zeros(arg.handle.data.shape, dtype=arg.handle.data.dtype) for arg in input]
    _fold(self, input, self.axis, outputs, scan=True)
    return [self.to_tensor(out, arg.dtype) for out, arg in zip(outputs, input)]


@_or_original("generic_reduce")
def generic_reduce(self, input):
    original_axis = self.axis
    input, axis = self.unravel(input, self.axis)
    in_shape = input[0].handle.data.shape
    outputs = [np.zeros(in_shape[:axis] + in_shape[axis + 1 :], dtype=arg.handle.data.dtype) for arg in input]
    _fold(self, input, axis, outputs, scan=False)
    ret = []
    for out, arg in zip(outputs, input):
        if self.keep_dims:
            if original_axis is not None:
                out = np.expand_dims(out, axis)
            else:
                out = out.reshape((1,) * len(in_shape))
        elif original_axis is None:
            out = out.item()
        ret.append(self.to_tensor(out, arg.dtype))
    return ret


class _NoScope:
    def restore(self) -> None:
        pass


# Per launch in progress, innermost last: the language modules patched since it began, by its own patch and by its
# helpers' (None until its own). The standard library's helpers (tl.sum, tl.zeros) see triton.language.core.
_LAUNCHES: list[frozenset | None] = []


def _launch(self, *args, **kwargs):
    _LAUNCHES.append(None)
    try:
        return ORIGINAL["launch"](self, *args, **kwargs)
    finally:
        _LAUNCHES.pop()


def _patch_lang(fn):
    """The interpreter's ``_patch_lang``; a jit helper's call gets an empty scope when the launches in progress
    patched every language module it sees."""
    import triton.language as tl

    langs = frozenset(v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
    if _LAUNCHES and _LAUNCHES[-1] is None:  # the launch's own patch
        scope = ORIGINAL["_patch_lang"](fn)
        _LAUNCHES[-1] = langs
        return scope
    if _LAUNCHES and langs and langs <= frozenset().union(*(p for p in _LAUNCHES if p)):
        return _NoScope()
    scope = ORIGINAL["_patch_lang"](fn)
    if _LAUNCHES:  # a helper's scope is never restored: what it patched stays so until this launch ends
        _LAUNCHES[-1] = _LAUNCHES[-1] | langs
    return scope


def install() -> bool:
    """Swap both speed-ups in (once); returns whether they are in."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    scan_ops, reduce_ops = getattr(interpreter, "ScanOps", None), getattr(interpreter, "ReduceOps", None)
    hooks = (
        (scan_ops, "generic_scan"),
        (reduce_ops, "generic_reduce"),
        (reduce_ops, "unravel"),
        (interpreter, "_patch_lang"),
        (getattr(interpreter, "GridExecutor", None), "__call__"),
    )
    if not all(hasattr(cls, name) for cls, name in hooks):
        return False
    if not ORIGINAL:
        ORIGINAL["generic_scan"] = scan_ops.generic_scan
        ORIGINAL["generic_reduce"] = reduce_ops.generic_reduce
        ORIGINAL["_patch_lang"] = interpreter._patch_lang
        ORIGINAL["launch"] = interpreter.GridExecutor.__call__
        scan_ops.generic_scan = generic_scan
        reduce_ops.generic_reduce = generic_reduce
        interpreter._patch_lang = _patch_lang
        interpreter.GridExecutor.__call__ = _launch
    return True
