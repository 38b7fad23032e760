"""Instruction census of the scan kernels, compiled for a GPU target without a GPU.

    python scripts/sass_census.py --n 16 --config 8,32,1,4,32,1,4,0,1 --z
    python scripts/sass_census.py --n 1 --config 4,32,1,32,32,1,1,1,1 --kernel fwd

Compiles ``_scan_bwd_nd_kernel`` (or the forward) with Triton for ``--arch`` (default sm_90) and disassembles the
cubin with the ``cuobjdump`` that ships with Triton. Prints registers, stack bytes and a count of the static SASS
instructions by class (shuffles, MUFU, FP32, integer, loads/stores, selects) for the whole kernel and for its three
largest loops (from a backward branch's target to the branch, by address). ``--json`` saves
the same. Static counts, not a profile: they bound the issue cost per chunk and say nothing of latency, memory
stalls or scheduling. On an H200 a backward whose group loop this script counted (Triton 3.6) at 1,081
instructions (62 shuffles) ran 1.84x slower than one counted at 1,606 (320 shuffles); see benchmarks/NOTES-scan.md
v7.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.triton_scan import fixed_channel_sums, lane_sum, register_cap_ok
from kernels.triton_scan_nd import _scan_bwd_nd_kernel, _scan_fwd_nd_kernel

_CLASSES = {
    "shfl": ("SHFL",),
    "redux": ("REDUX",),
    "mufu": ("MUFU",),
    "fp32": ("FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FCHK"),
    "int": ("IADD3", "IMAD", "LEA", "LOP3", "SHF", "ISETP", "IABS", "IMNMX", "PRMT", "SGXT"),
    "select": ("SEL",),  # FSEL is counted with fp32
    "mov": ("MOV", "S2R", "CS2R", "UMOV", "S2UR"),
    "ldg": ("LDG",),
    "stg": ("STG", "RED", "ATOM"),
    "local": ("LDL", "STL"),
    "shared": ("LDS", "STS", "BAR"),
    "convert": ("F2F", "F2I", "I2F", "F2FP"),
}


def _tool_path(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _tool(name: str) -> str:
    path = _tool_path(name)
    if not os.path.exists(path):
        raise SystemExit(f"error: {name} not found next to Triton at {path}; install triton with its CUDA tools")
    return path


def _signature(fn, constexprs: dict[str, object]) -> dict[str, str]:
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "orders_ptr":
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*bf16" if name in ("u_ptr", "delta_ptr", "z_ptr", "dy_ptr", "y_ptr", "du_ptr",
                                            "ddelta_ptr", "dz_ptr", "B_ptr", "C_ptr") else "*fp32"  # fmt: skip
        else:
            sig[name] = "i32"
    return sig


def census(sass: str) -> dict[str, int]:
    ops = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)]
    out = {"total": len(ops)}
    for cls, names in _CLASSES.items():
        out[cls] = sum(1 for op in ops if op.split(".")[0] in names)
    return out


def loops(sass: str) -> list[tuple[int, int, str]]:
    """(start, end, SASS text) of every backward-branch loop (from the branch target to the branch), largest first."""
    lines = sass.splitlines()
    addr = {}
    for i, line in enumerate(lines):
        m = re.search(r"/\*([0-9a-f]{4,})\*/", line)
        if m:
            addr[int(m.group(1), 16)] = i
    found = []
    for i, line in enumerate(lines):
        m = re.search(r"/\*([0-9a-f]{4,})\*/.*\bBRA\s+0x([0-9a-f]+)", line)
        if m:
            here, target = int(m.group(1), 16), int(m.group(2), 16)
            if target < here and target in addr:
                found.append((target, here, "\n".join(lines[addr[target] : i + 1])))
    return sorted(found, key=lambda f: f[0] - f[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", choices=["bwd", "fwd"], default="bwd")
    p.add_argument("--n", type=int, default=16, help="state size N")
    p.add_argument("--config", required=True, help="a scan_config tuple, e.g. 8,32,1,4,32,1,4,0,1")
    p.add_argument("--z", action="store_true", help="with the z gate")
    p.add_argument("--packed-sums", action="store_true", help="the backward's opt-in packed bf16 dB/dC channel sums")
    p.add_argument("--butterfly-sums", action="store_true",
                   help="fp32 shuffle sums of dB/dC, as kernels.set_fixed_channel_sums(False)")  # fmt: skip
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dump", default=None, help="write the SASS here")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    try:
        cfg = [int(v) for v in args.config.split(",")]
    except ValueError:
        cfg = []
    if not 7 <= len(cfg) <= 12 or min(cfg[:7]) < 1 or args.n < 1 or not register_cap_ok(cfg):
        print(f"error: --config needs the 7-12 positive integers of the (T, N, D) kernels (an 11th, the register cap, "
              f"0 or 64-255), e.g. 8,32,1,4,32,1,4,0,1, "
              f"and --n >= 1; got --config {args.config} --n {args.n}", file=sys.stderr)  # fmt: skip
        return 2
    common = dict(HAS_D=True, HAS_Z=args.z, HAS_BIAS=True, SOFTPLUS=True, HAS_ORDERS=True, IDX64=False,
                  BLOCK_N=triton.next_power_of_2(args.n))  # fmt: skip
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        print(f"error: --json {args.json}: its folder does not exist; create it or pick another path", file=sys.stderr)
        return 2
    if args.kernel == "bwd":
        fn, warps = _scan_bwd_nd_kernel, cfg[2]
        consts = dict(common, BLOCK_T=cfg[0], BLOCK_D=cfg[1], GROUP_N=min(cfg[6], common["BLOCK_N"]),
                      PREFETCH=bool(cfg[7]) if len(cfg) > 7 else False,
                      ONE_DECAY=bool(cfg[8]) if len(cfg) > 8 else False)  # fmt: skip
        # as scan_bwd chooses for bf16 B and C: the reduce-scatter (N = 1), the opt-in packed sums, or the fixed-point
        bf16 = torch.empty(0, dtype=torch.bfloat16)
        consts["LANE_SUM"] = lane_sum(cfg[0], cfg[1], warps, consts["GROUP_N"])
        consts["PACK_BC"] = args.packed_sums and not consts["LANE_SUM"]
        consts["FIXED_SUM"] = (
            not args.butterfly_sums
            and not consts["PACK_BC"]
            and args.arch >= 80  # redux.sync
            and fixed_channel_sums(cfg[0], cfg[1], warps, consts["GROUP_N"], bf16, bf16)
        )
    else:
        fn, warps = _scan_fwd_nd_kernel, cfg[5]
        consts = dict(common, BLOCK_T=cfg[3], BLOCK_D=cfg[4], SAVE_T=cfg[0], SAVE_STATES=True, STORE_Y=True,
                      SPLIT=False, CARRY_OUT=False)  # the unsplit forward  # fmt: skip
    src = ASTSource(fn=fn, signature=_signature(fn, consts), constexprs=consts)
    options = {"num_warps": warps}
    if args.kernel == "bwd" and len(cfg) > 10 and cfg[10] > 0:  # the backward's register cap, as scan_bwd passes it
        options["maxnreg"] = cfg[10]
    compiled = triton.compile(src, target=GPUTarget("cuda", args.arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    spill = re.search(r"STACK:(\d+)", res)
    if args.dump:
        with open(args.dump, "w") as f:
            f.write(sass)
    row = {"kernel": args.kernel, "n": args.n, "config": cfg, "z": args.z, "arch": f"sm_{args.arch}",
           "packed_sums": bool(consts.get("PACK_BC", False)), "fixed_sums": bool(consts.get("FIXED_SUM", False)),
           "triton": triton.__version__, "registers": int(regs.group(1)) if regs else None,
           "stack_bytes": int(spill.group(1)) if spill else None,
           "whole": census(sass),
           "loops": {f"{a:#x}-{b:#x}": census(text) for a, b, text in loops(sass)[:3]}}  # fmt: skip
    print(f"{args.kernel} N={args.n} config={args.config} z={args.z}: {row['registers']} registers, "
          f"{row['stack_bytes']} B stack")  # fmt: skip
    keys = list(row["whole"])
    print(f"{'':14}" + "".join(f"{k:>8}" for k in keys))
    for name, counts in [("whole", row["whole"]), *row["loops"].items()]:
        print(f"{name:14}" + "".join(f"{counts[k]:>8}" for k in keys))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
