"""Two speed-ups of Triton's CPU interpreter for the test suite; what the kernels compute is unchanged.

**Folds a slice at a time.** Under ``TRITON_INTERPRET=1`` a ``tl.associative_scan`` or ``tl.reduce`` whose combine
function is not one of Triton's own (sum, prod, min, max) falls back to ``ScanOps.generic_scan`` /
``ReduceOps.generic_reduce``, which walk the block one element at a time: a Python call of the combine function per
element, most of the interpreted scan kernels' time. The versions here do the same left fold along the axis (element
0, then combine(acc, element i) for i = 1, 2, ..., the accumulator stored in the input's dtype after every step) but
call the combine function once per position along the axis, on the whole slice across the other axes. The combine
functions are elementwise, so each element sees the same operations in the same order.

**The language patched once per launch.** A launch patches ``triton.language`` with the interpreter's versions of its
builtins and restores it when the grid is done; every call of a ``@triton.jit`` helper inside the kernel then patches
it again (``inspect.getmembers`` over the modules, about a millisecond per call, and a scope that is never restored),
finding every builtin already replaced. Here a call whose modules are already patched gets an empty scope instead.

``tests/test_interpreter_speedups.py`` runs kernels through both versions of each and compares them bit for bit, and
checks that a launch patches once and restores what it patched. ``install()`` changes nothing when the
interpreter is not the one these were written against.
"""

from __future__ import annotations

import numpy as np

ORIGINAL: dict[str, object] = {}


def _store(out: np.ndarray, idx: tuple, value) -> None:
    """``out[idx] = value``, cast to ``out``'s dtype as the element-wise walk's stores are (a 1-element result fills a
    0-d slot)."""
    value = np.asarray(value)
    if np.ndim(out[idx]) == 0:
        value = value.reshape(())
    out[idx] = value


def _fold(op, inputs, axis: int, outputs: list, scan: bool) -> None:
    """The left fold along ``axis``: a scan stores step i at position i, a reduction overwrites its one slot; either
    way the accumulator is read back from the store, in the inputs' dtypes."""
    import triton.language as tl

    data = [arg.handle.data for arg in inputs]
    dtypes = [arg.dtype for arg in inputs]
    along = (slice(None),) * axis
    acc = ()
    for i in range(data[0].shape[axis]):
        cur = tuple(op.to_tensor(d[(*along, i)], t) for d, t in zip(data, dtypes))
        if i == 0:
            values = [d[(*along, 0)] for d in data]
        else:
            ret = op.combine_fn.fn(*acc, *cur)
            ret = ret if isinstance(ret, tuple) else (ret,)
            values = [r.handle.data if isinstance(r, tl.core.tensor) else r for r in ret]
        idx = (*along, i) if scan else (...,)
        for out, v in zip(outputs, values):
            _store(out, idx, v)
        acc = tuple(op.to_tensor(out[idx], t) for out, t in zip(outputs, dtypes))


def generic_scan(self, input):
    outputs = [np.zeros(arg.handle.data.shape, dtype=arg.handle.data.dtype) for arg in input]
    _fold(self, input, self.axis, outputs, scan=True)
    return [self.to_tensor(out, arg.dtype) for out, arg in zip(outputs, input)]


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


def _patch_lang(fn):
    """The interpreter's ``_patch_lang``, skipped when every language module ``fn`` sees is patched already."""
    import inspect

    import triton.language as tl

    langs = [v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)]
    if langs and not any(tl.core.is_builtin(lang.load) for lang in langs):
        return _NoScope()
    return ORIGINAL["_patch_lang"](fn)


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
    )
    if not all(hasattr(cls, name) for cls, name in hooks):
        return False
    if not ORIGINAL:
        ORIGINAL["generic_scan"] = scan_ops.generic_scan
        ORIGINAL["generic_reduce"] = reduce_ops.generic_reduce
        scan_ops.generic_scan = generic_scan
        reduce_ops.generic_reduce = generic_reduce
        ORIGINAL["_patch_lang"] = interpreter._patch_lang
        interpreter._patch_lang = _patch_lang
    return True
