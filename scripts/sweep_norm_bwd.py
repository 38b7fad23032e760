"""Tile shapes of the LayerNorm and RMSNorm backward kernels at the models' widths (GPU).

    python scripts/sweep_norm_bwd.py [--json F] [--commit SHA]

For each shape (VMamba-T's four LayerNorm widths at batch 128 and 224 px, Vim-Ti's RMSNorm), every (rows per tile,
warps, programs per SM) in the grid is launched on the same fp32 x and bf16 dy, checked against the first config's dx
and weight gradient, and timed with ``triton.testing.do_bench``. Prints the built-in choice and the five fastest per
shape, and writes every row to JSON with the device, versions and commit.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from triton.testing import do_bench

from kernels._host import cdiv, next_pow2
from kernels.check_gpu import env_info
from kernels.triton_norm import _BWD_ROWS, _bwd_launch, _ln_bwd_kernel, _rms_bwd_kernel
from kernels.triton_scan import sm_count

SHAPES = [("ln", 401408, 96), ("ln", 100352, 192), ("ln", 25088, 384), ("ln", 6272, 768), ("rms", 25216, 192)]
GRID = list(itertools.product((4, 8, 16, 32), (1, 2, 4, 8), (2, 4, 8, 16)))


def sweep(kind: str, n: int, c: int, dev: torch.device) -> list[dict]:
    gen = torch.Generator(dev).manual_seed(0)
    x = torch.randn(n, c, device=dev, generator=gen)
    dy = torch.randn(n, c, device=dev, generator=gen).bfloat16()
    w = torch.randn(c, device=dev, generator=gen)
    dx = torch.empty_like(x)
    block_c, sms = next_pow2(c), sm_count(dev)
    built_in = _bwd_launch(n, c, dev)
    rows, ref = [], None
    for tile_rows, warps, pps in GRID:
        tiles = cdiv(n, tile_rows)
        per = max(1, cdiv(tiles, pps * sms))
        progs = cdiv(tiles, per)
        part = torch.empty(2, progs, c, device=dev)

        def launch(tile_rows=tile_rows, warps=warps, per=per, progs=progs, part=part):
            if kind == "ln":
                _ln_bwd_kernel[(progs,)](
                    dy, x, w, dx, part[0], part[1], n, c, 1e-5, per,
                    HAS_W=True, NEED_WB=True, ROWS=tile_rows, BLOCK_C=block_c, num_warps=warps,
                )  # fmt: skip
            else:
                _rms_bwd_kernel[(progs,)](
                    dy, x, w, dx, part[0], x, x, n, c, 1e-5, per,
                    HAS_DR_IN=False, STORE_DR=False, ROWS=tile_rows, BLOCK_C=block_c, num_warps=warps,
                )  # fmt: skip

        launch()
        got = (dx.clone(), part[0].sum(0))
        ref = ref or got
        dw_scale = max(1.0, ref[1].abs().max().item())
        err = max((got[0] - ref[0]).abs().max().item(), (got[1] - ref[1]).abs().max().item() / dw_scale)
        ms = do_bench(launch, warmup=10, rep=40)
        rows.append({
            "kind": kind, "rows_total": n, "c": c, "tile_rows": tile_rows, "warps": warps, "programs_per_sm": pps,
            "programs": progs, "us": ms * 1e3, "gb_s": n * c * 10 / ms / 1e6, "max_err": err,
            "built_in": tile_rows == _BWD_ROWS and (warps, per, progs) == built_in[1:],
        })  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--commit", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    out = {**env_info(args.commit), "bytes_per_element": "x fp32 read, dy bf16 read, dx fp32 written", "rows": []}
    print(f"{'shape':>16} {'config (rows, warps, programs/SM)':>34} {'us':>8} {'GB/s':>6} {'max err':>9}")
    for kind, n, c in SHAPES:
        rows = sweep(kind, n, c, dev)
        out["rows"] += rows
        marked = [r for r in rows if r["built_in"]] + sorted(rows, key=lambda r: r["us"])[:5]
        for r in marked:
            tag = "built-in " if r["built_in"] else ""
            cfg = f"{tag}({r['tile_rows']}, {r['warps']}, {r['programs_per_sm']})"
            shape = f"{kind} {n}x{c}"
            print(f"{shape:>16} {cfg:>34} {r['us']:8.1f} {r['gb_s']:6.0f} {r['max_err']:9.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
