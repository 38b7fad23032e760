"""Device time of the mixer projections' weight-gradient GEMMs: one batched GEMM against interleaved token splits.

x_proj's and dt_proj's weight gradients reduce over the B·L tokens into small outputs (Vim-Ti: 2 × 48 × 384 and
2 × 384 × 16). Each row times, on the GPU, CUDA-graph replays of: the batched GEMM as the mixer ran it before
(``*_cur``), one GEMM per order, and ``S`` interleaved token slices (``supernet.mixer._split_tokens``) as S·K GEMM
batches whose fp32 (``out_dtype``) or bf16 partials are summed. Prints a table, writes JSON (device, versions,
commit), and the relative error of each against an fp32 sum of the same bf16 operands.

    PYTHONPATH=. python benchmarks/projections_h200/dw_split.py --json benchmarks/projections_h200/dw_split.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from kernels.check_gpu import env_info
from supernet.mixer import _split_tokens

SHAPES = [  # name, tokens (B·L), K, D, x_proj width (R' + 2N), R'
    ("Vim-Ti layer", 128 * 197, 2, 384, 48, 16),
    ("LocalVim-T registered child", 128 * 196, 4, 384, 48, 16),
    ("LocalVim-T supernet", 128 * 196, 8, 256, 40, 8),
]


def device_us(fn, reps: int = 20) -> float:
    """Median device time per call (µs) of ``reps`` calls captured in a CUDA graph, over 7 replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(7):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / reps * 1e3)
    return statistics.median(times)


def cases(rows: int, k: int, d: int, w: int, r: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    bf = torch.bfloat16
    u = torch.randn(rows, k, d, device="cuda", dtype=bf)  # the scan input, (B·L, K, D)
    dx = torch.randn(rows, k, w, device="cuda", dtype=bf)  # x_proj's output gradient, token-major
    dd = torch.randn(rows, k, d, device="cuda", dtype=bf)  # delta's gradient
    dt = dx[..., :r]  # stands in for the saved Δ-rank columns (same layout)
    dxk, u2, ddk, dtk = dx.transpose(0, 1).contiguous(), u.transpose(0, 1), dd.transpose(0, 1), dt.transpose(0, 1)
    fns = {
        "xproj_cur": lambda: torch.matmul(dxk.transpose(1, 2), u2),
        "xproj_per_order": lambda: [dxk[i].t() @ u2[i] for i in range(k)],
        "dtproj_cur": lambda: torch.bmm(ddk.transpose(1, 2), dtk.contiguous()),
        "dtproj_per_order": lambda: [ddk[i].t() @ dtk[i] for i in range(k)],
    }
    for s in (4, 8, 16, 32):
        if rows % s:
            continue

        def split(a, b, s=s, out_dtype=torch.float32):
            pa, pb = _split_tokens(a, s).transpose(1, 2), _split_tokens(b, s)
            part = torch.bmm(pa, pb, out_dtype=out_dtype) if out_dtype else torch.bmm(pa, pb)
            return part.view(s, k, *part.shape[1:]).sum(0, dtype=torch.float32)

        fns[f"xproj_split{s}_fp32"] = lambda split=split: split(dx, u)
        fns[f"xproj_split{s}_bf16"] = lambda split=split: split(dx, u, out_dtype=None)
        fns[f"dtproj_split{s}_fp32"] = lambda split=split: split(dd, dt)
    ref_x = torch.einsum("rkw,rkd->kwd", dx.float(), u.float())
    ref_t = torch.einsum("rkd,rkq->kdq", dd.float(), dt.float())
    return fns, ref_x, ref_t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--commit", default=None)
    args = p.parse_args()
    rows_out = []
    print(f"{'shape':<30} {'case':<20} {'µs':>8} {'rel err':>10}")
    for name, rows, k, d, w, r in SHAPES:
        fns, ref_x, ref_t = cases(rows, k, d, w, r)
        row = {"shape": name, "tokens": rows, "K": k, "D": d, "width": w, "rank": r}
        for case, fn in fns.items():
            out = fn()
            out = torch.stack(out) if isinstance(out, list) else out
            ref = ref_x if case.startswith("xproj") else ref_t
            err = ((out.float() - ref).norm() / ref.norm()).item()
            row[case] = {"us": round(device_us(fn), 2), "rel_err": err}
            print(f"{name:<30} {case:<20} {row[case]['us']:>8.2f} {err:>10.2e}")
        rows_out.append(row)
    if args.json:
        info = env_info(args.commit)
        with open(args.json, "w") as f:
            json.dump({**info, "rows": rows_out}, f, indent=1)
        print("wrote", args.json)


if __name__ == "__main__":
    main()
