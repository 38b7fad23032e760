"""Where a Triton launch's host time goes (Triton's JIT path against a direct ``CompiledKernel.run``), on a GPU.

    OUT=folder python benchmarks/host_h200/launch_probe.py

Prints µs per call (median of 5 repeats of 2000 back-to-back calls) and writes ``launch_probe.json`` (device, versions)
and the sources of the Triton functions timed, under $OUT.
"""

import inspect
import json
import os
import statistics
import time

import torch
import triton
import triton.compiler.compiler as C
import triton.language as tl
import triton.runtime.jit as J
from triton.runtime import driver


@triton.jit
def small(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(y_ptr + o, tl.load(x_ptr + o, mask=o < n), mask=o < n)


@triton.jit
def many(
    a0,
    a1,
    a2,
    a3,
    a4,
    a5,
    a6,
    a7,
    a8,
    a9,
    a10,
    a11,
    i0,
    i1,
    i2,
    i3,
    i4,
    i5,
    i6,
    i7,
    i8,
    i9,
    i10,
    i11,
    i12,
    i13,
    i14,
    i15,
    B0: tl.constexpr,
    B1: tl.constexpr,
    B2: tl.constexpr,
    B3: tl.constexpr,
    B4: tl.constexpr,
):
    o = tl.arange(0, B0)
    tl.store(
        a1 + o, tl.load(a0 + o) + i0 + i1 + i2 + i3 + i4 + i5 + i6 + i7 + i8 + i9 + i10 + i11 + i12 + i13 + i14 + i15
    )


def t(fn, iters=2000, reps=5):
    fn()
    torch.cuda.synchronize()
    s = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        s.append((time.perf_counter() - t0) / iters * 1e6)
    return statistics.median(s)


x = torch.randn(1024, device="cuda")
y = torch.empty_like(x)
ts = [torch.randn(1024, device="cuda") for _ in range(12)]
ints = [1024 + 16 * i for i in range(16)]
rows = {}
rows["torch add"] = t(lambda: torch.add(x, x))
rows["small jit launch"] = t(lambda: small[(1,)](x, y, 1024, BLOCK=1024))
k = small[(1,)](x, y, 1024, BLOCK=1024)
dev = torch.cuda.current_device()
stream = driver.active.get_current_stream(dev)
fn, meta = k.function, k.packed_metadata
binder = small.device_caches[dev][-1]
sa = list(binder(x, y, 1024, BLOCK=1024)[0].values())
rows["small direct run"] = t(lambda: k.run(1, 1, 1, stream, fn, meta, None, None, None, *sa))
rows["small direct run +stream query"] = t(
    lambda: k.run(1, 1, 1, driver.active.get_current_stream(dev), fn, meta, None, None, None, *sa)
)
binder = small.device_caches[dev][-1]
rows["small launch_metadata"] = t(lambda: k.launch_metadata((1,), stream, *sa))
rows["small binder only"] = t(lambda: binder(x, y, 1024, BLOCK=1024))
cm = dict(B0=1024, B1=1, B2=2, B3=4, B4=8)
rows["many jit launch (28 args)"] = t(lambda: many[(1,)](*ts, *ints, **cm))
km = many[(1,)](*ts, *ints, **cm)
bm = many.device_caches[dev][-1]
ma = list(bm(*ts, *ints, **cm)[0].values())
rows["many direct run"] = t(lambda: km.run(1, 1, 1, stream, km.function, km.packed_metadata, None, None, None, *ma))
bm = many.device_caches[dev][-1]
rows["many binder only"] = t(lambda: bm(*ts, *ints, **cm))
rows["get_current_device+stream"] = t(lambda: driver.active.get_current_stream(driver.active.get_current_device()))
rows["torch.empty"] = t(lambda: torch.empty(128, 197, 2, 384, device="cuda"))
for name, us in rows.items():
    print(f"{name:40s} {us:8.2f} us")

open(os.environ["OUT"] + "/jit_run_src.py", "w").write(
    inspect.getsource(J.JITFunction.run)
    + "\n\n"
    + inspect.getsource(J.create_function_from_signature)
    + "\n\n"
    + inspect.getsource(J.compute_cache_key)
)

open(os.environ["OUT"] + "/compiled_src.py", "w").write(inspect.getsource(C.CompiledKernel))
json.dump(
    {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "rows": rows},
    open(os.environ["OUT"] + "/launch_probe.json", "w"),
    indent=1,
)
