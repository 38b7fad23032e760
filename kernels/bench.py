"""Benchmark of the fused K-order scan on a GPU: ours (Triton, real orders) vs mamba-ssm in one launch on
pre-permuted inputs vs the LocalMamba pattern (K launches with torch gathers and inverse gathers).

Anchor shapes (batch, channels per order, L, N, K) from the project's reference measurements; bf16 inputs, fp32
state, bf16 output, D and delta_bias always, the z gate for the Vim-style shapes (Ku = K, per-order conv) and none
for the VMamba-style ones (Ku = 1, a shared 2-D conv). Prints a table and writes ``benchmarks/scan_<gpu>.json``
with the device, versions, commit, every time, the ratios and the fractions of two floors: bytes moved over the
measured copy bandwidth, and exp count over the measured exp2 throughput.

    python -m kernels.bench --commit SHA [--mamba-anchor DIR] [--out benchmarks/scan_h100.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import triton
import triton.language as tl
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from kernels.check_gpu import env_info, try_load_mamba
from kernels.mamba_backend import to_mamba_layout
from kernels.ops import causal_conv1d, selective_scan
from kernels.testing import make_orders, make_scan_inputs
from kernels.triton_scan import load_scan_configs, scan_bwd, scan_config, scan_fwd, set_scan_config

# name, batch, dim per order, L, N, K, Ku, z, grid, orders
ANCHORS = [
    ("LocalVim-T supernet", 128, 384, 197, 16, 8, 8, True, (14, 14),
     ("h", "h_flip", "v", "v_flip", "w2", "w2_flip", "w7", "w7_flip")),
    ("Vim-Ti layer", 128, 384, 197, 16, 2, 2, True, (14, 14), ("h", "h_flip")),
    ("VMamba-T stage 1", 128, 96, 3136, 1, 4, 1, False, (56, 56), ("h", "v", "h_flip", "v_flip")),
    ("LocalVMamba-T stage 1", 128, 192, 3136, 16, 8, 1, False, (56, 56),
     ("h", "h_flip", "v", "v_flip", "w2", "w2_flip", "w7", "w7_flip")),
]  # fmt: skip
GRAD_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
REF_MAX_L = 256  # the pure-PyTorch reference is timed where affordable: the short-sequence anchors


def real_orders(seqlen: int, hw: tuple[int, int], names: tuple[str, ...]) -> torch.Tensor:
    return make_orders(seqlen, hw, len(names), names)


def kernel_times(fn, reps: int = 5) -> list[tuple[str, float, int]]:
    """(kernel name, device ms per call of ``fn``, launches per call) for every CUDA kernel ``fn`` runs, longest first
    (torch.profiler over ``reps`` calls; unlike a wall-clock median, no host launch work)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / (reps * 1e3), e.count // reps) for e in prof.key_averages()]
    return sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])


def _leaves(inputs: dict) -> dict:
    return {n: (t.detach().requires_grad_() if t is not None else None) for n, t in inputs.items()}


def _timed(fn_fwd, leaves: dict, dy: torch.Tensor) -> tuple[float, float]:
    """Median ms of the forward (no grad) and of forward + backward."""
    with torch.no_grad():
        t_fwd = do_bench(fn_fwd, warmup=25, rep=100, return_mode="median")
    params = [t for t in leaves.values() if t is not None]

    def fwd_bwd():
        for p in params:
            p.grad = None
        fn_fwd().backward(dy)

    t_fb = do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median")
    return t_fwd, t_fb


@triton.jit
def _exp_chain_kernel(x_ptr, y_ptr, n, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(ITERS):
        x = tl.exp2(x * -0.5)
        acc += x
    tl.store(y_ptr + offs, acc, mask=offs < n)


def measure_ceilings() -> dict:
    """Copy bandwidth (bytes read + written per second) and exp2 throughput (per second) on this GPU."""
    a = torch.empty(1 << 28, device="cuda", dtype=torch.float32).normal_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=10, rep=50, return_mode="median")
    copy_bw = 2 * a.numel() * 4 / (ms * 1e-3)
    n, iters = 1 << 24, 256
    x = torch.rand(n, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: _exp_chain_kernel[(n // 1024,)](x, y, n, ITERS=iters, BLOCK=1024), warmup=10, rep=50,
                  return_mode="median")  # fmt: skip
    return {"copy_bytes_per_s": copy_bw, "exp2_per_s": n * iters / (ms * 1e-3)}


def floors(batch, dim, seqlen, n, k, ku, has_z, esize=2) -> dict:
    """Fewest bytes and exps: inputs read once, outputs written once; the backward recomputes the exps once."""
    tok = batch * seqlen
    fwd_bytes = esize * tok * (ku * dim + k * dim + 2 * k * n + (k * dim if has_z else 0) + k * dim)
    # backward: reads u, delta, B, C, z, dy; writes du, ddelta, dB, dC, dz
    bwd_bytes = esize * tok * (2 * ku * dim + 2 * k * dim + 4 * k * n + (2 * k * dim if has_z else 0) + k * dim)
    exps = tok * k * dim * n
    return {"fwd_bytes": fwd_bytes, "fwd_bwd_bytes": fwd_bytes + bwd_bytes, "fwd_exps": exps, "fwd_bwd_exps": 2 * exps}


def bench_shape(name, batch, dim, seqlen, n, k, ku, has_z, hw, order_names, with_mamba, ceil) -> dict:
    torch.manual_seed(0)
    inputs = make_scan_inputs(batch, seqlen, k, dim, n, ku=ku, dtype=torch.bfloat16, device="cuda", has_z=has_z)
    orders = real_orders(seqlen, hw, order_names).cuda()
    dy = torch.randn(batch, seqlen, k, dim, device="cuda", dtype=torch.bfloat16)
    rec = {"name": name, "batch": batch, "dim": dim, "L": seqlen, "N": n, "K": k, "Ku": ku, "z": has_z,
           "orders": list(order_names)}  # fmt: skip
    ours = _leaves(inputs)
    rec["ours_fwd_ms"], rec["ours_fwd_bwd_ms"] = _timed(
        lambda: selective_scan(**ours, orders=orders, backend="triton"), ours, dy
    )
    if with_mamba:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        us, ds, Bs, Cs, zs = to_mamba_layout(
            inputs["u"], inputs["delta"], inputs["B"], inputs["C"], inputs["z"], orders
        )
        pre = _leaves({"u": us, "delta": ds, "A": inputs["A"].reshape(k * dim, n), "B": Bs, "C": Cs,
                       "D": inputs["D"].reshape(-1), "z": zs,
                       "delta_bias": inputs["delta_bias"].reshape(-1)})  # fmt: skip
        dy_m = dy.permute(0, 2, 3, 1).reshape(batch, k * dim, seqlen).contiguous()
        rec["mamba_fwd_ms"], rec["mamba_fwd_bwd_ms"] = _timed(
            lambda: selective_scan_fn(pre["u"], pre["delta"], pre["A"], pre["B"], pre["C"], pre["D"], pre["z"],
                                      pre["delta_bias"], True), pre, dy_m)  # fmt: skip
        lm = _leaves(inputs)
        inv = torch.argsort(orders, dim=1)

        def localmamba():
            outs = []
            for j in range(k):
                o, iv = orders[j], inv[j]
                uj = lm["u"][:, :, j if ku == k else 0].index_select(1, o).transpose(1, 2).contiguous()
                dj = lm["delta"][:, :, j].index_select(1, o).transpose(1, 2).contiguous()
                bj = lm["B"][:, :, j].index_select(1, o).transpose(1, 2).contiguous()
                cj = lm["C"][:, :, j].index_select(1, o).transpose(1, 2).contiguous()
                zj = lm["z"][:, :, j].index_select(1, o).transpose(1, 2).contiguous() if has_z else None
                yj = selective_scan_fn(uj, dj, lm["A"][j], bj, cj, lm["D"][j], zj, lm["delta_bias"][j], True)
                outs.append(yj.transpose(1, 2).index_select(1, iv))
            return torch.stack(outs, dim=2)

        rec["localmamba_fwd_ms"], rec["localmamba_fwd_bwd_ms"] = _timed(localmamba, lm, dy)
        for what in ("fwd", "fwd_bwd"):
            rec[f"speedup_vs_mamba_{what}"] = rec[f"mamba_{what}_ms"] / rec[f"ours_{what}_ms"]
            rec[f"speedup_vs_localmamba_{what}"] = rec[f"localmamba_{what}_ms"] / rec[f"ours_{what}_ms"]
    if seqlen <= REF_MAX_L:  # the reference loops over L in Python and keeps every step for autograd
        ref = _leaves(inputs)
        rec["ref_fwd_ms"], rec["ref_fwd_bwd_ms"] = _timed(
            lambda: selective_scan(**ref, orders=orders, backend="ref"), ref, dy
        )
        for what in ("fwd", "fwd_bwd"):
            rec[f"speedup_vs_ref_{what}"] = rec[f"ref_{what}_ms"] / rec[f"ours_{what}_ms"]
        del ref
        torch.cuda.empty_cache()
    fl = floors(batch, dim, seqlen, n, k, ku, has_z)
    rec.update(fl)
    for what in ("fwd", "fwd_bwd"):
        t = rec[f"ours_{what}_ms"] * 1e-3
        rec[f"ours_{what}_bytes_floor_fraction"] = fl[f"{what}_bytes"] / ceil["copy_bytes_per_s"] / t
        rec[f"ours_{what}_exp_floor_fraction"] = fl[f"{what}_exps"] / ceil["exp2_per_s"] / t
    return rec


def bench_vs_length(with_mamba: bool, tokens: int = 128 * 196, dim: int = 192, n: int = 16, k: int = 4) -> list:
    """Time vs L (196 → 4096) at a fixed number of tokens B·L; h, v, h_flip, v_flip orders on a near-square grid."""
    out = []
    for hw in ((14, 14), (28, 28), (32, 32), (32, 64), (56, 56), (64, 64)):
        seqlen = hw[0] * hw[1]
        batch = max(1, tokens // seqlen)
        torch.manual_seed(0)
        inputs = make_scan_inputs(batch, seqlen, k, dim, n, ku=1, dtype=torch.bfloat16, device="cuda", has_z=False)
        orders = real_orders(seqlen, hw, ("h", "v", "h_flip", "v_flip")).cuda()
        dy = torch.randn(batch, seqlen, k, dim, device="cuda", dtype=torch.bfloat16)
        ours = _leaves(inputs)
        rec = {"L": seqlen, "batch": batch, "dim": dim, "N": n, "K": k}
        rec["ours_fwd_ms"], rec["ours_fwd_bwd_ms"] = _timed(
            lambda ours=ours, orders=orders: selective_scan(**ours, orders=orders, backend="triton"), ours, dy
        )
        if with_mamba:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

            us, ds, Bs, Cs, _ = to_mamba_layout(inputs["u"], inputs["delta"], inputs["B"], inputs["C"], None, orders)
            pre = _leaves({"u": us, "delta": ds, "A": inputs["A"].reshape(k * dim, n), "B": Bs, "C": Cs,
                           "D": inputs["D"].reshape(-1), "delta_bias": inputs["delta_bias"].reshape(-1)})  # fmt: skip
            dy_m = dy.permute(0, 2, 3, 1).reshape(batch, k * dim, seqlen).contiguous()
            rec["mamba_fwd_ms"], rec["mamba_fwd_bwd_ms"] = _timed(
                lambda p=pre: selective_scan_fn(p["u"], p["delta"], p["A"], p["B"], p["C"], p["D"], None,
                                                p["delta_bias"], True), pre, dy_m)  # fmt: skip
        out.append(rec)
        print(f"  L={seqlen:<5} B={batch:<4} ours {rec['ours_fwd_ms']:.3f} / {rec['ours_fwd_bwd_ms']:.3f} ms"
              + (f"   mamba {rec['mamba_fwd_ms']:.3f} / {rec['mamba_fwd_bwd_ms']:.3f} ms" if with_mamba else ""),
              flush=True)  # fmt: skip
    return out


def bench_conv(ceil: dict, batch=128, seqlen=197, k=8, dim=384, width=4, hw=(14, 14)) -> dict:
    """The per-order causal conv1d of a LocalVim-T supernet layer (shared input, K orders): Triton vs reference.

    Its share of the layer's conv + scan time bounds what fusing it into the scan could save.
    """
    names = ("h", "h_flip", "v", "v_flip", "w2", "w2_flip", "w7", "w7_flip")[:k]
    torch.manual_seed(0)
    x = torch.randn(batch, seqlen, 1, dim, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(k, dim, width, device="cuda") * 0.3
    bias = torch.randn(k, dim, device="cuda") * 0.1
    orders = real_orders(seqlen, hw, names).cuda()
    dy = torch.randn(batch, seqlen, k, dim, device="cuda", dtype=torch.bfloat16)
    rec = {"name": "LocalVim-T conv1d", "batch": batch, "L": seqlen, "K": k, "dim": dim, "width": width, "Kx": 1}
    for backend in ("triton", "ref"):
        leaves = _leaves({"x": x, "weight": w, "bias": bias})
        fn = lambda lv=leaves, be=backend: causal_conv1d(lv["x"], lv["weight"], lv["bias"], orders=orders,  # noqa: E731
                                                         activation="silu", backend=be)  # fmt: skip
        rec[f"{backend}_fwd_ms"], rec[f"{backend}_fwd_bwd_ms"] = _timed(fn, leaves, dy)
    tok = batch * seqlen
    fwd_bytes = 2 * tok * (dim + k * dim)  # read x once, write K outputs (bf16)
    bwd_bytes = 2 * tok * (k * dim + dim + dim)  # read dout and x, write dx
    rec["fwd_bytes_floor_fraction"] = fwd_bytes / ceil["copy_bytes_per_s"] / (rec["triton_fwd_ms"] * 1e-3)
    rec["fwd_bwd_bytes_floor_fraction"] = (
        (fwd_bytes + bwd_bytes) / ceil["copy_bytes_per_s"] / (rec["triton_fwd_bwd_ms"] * 1e-3)
    )
    print(f"  conv1d (B {batch}, L {seqlen}, K {k}, D {dim}, W {width}): triton {rec['triton_fwd_ms']:.3f} / "
          f"{rec['triton_fwd_bwd_ms']:.3f} ms, ref {rec['ref_fwd_ms']:.3f} / {rec['ref_fwd_bwd_ms']:.3f} ms, "
          f"byte floor {rec['fwd_bytes_floor_fraction']:.2f} / {rec['fwd_bwd_bytes_floor_fraction']:.2f}",
          flush=True)  # fmt: skip
    return rec


# Candidate block sizes per (BLOCK_N class, long sequence) for --tune; each list holds the untuned defaults of its class
# (scan_config), first where the class has one. Three numbers
# are the (T, D, N)-tile kernels (BLOCK_T, BLOCK_D, num_warps); seven to twelve are the (T, N, D)-tile kernels of
# triton_scan_nd: (backward BLOCK_T = saved-state interval, backward BLOCK_D, backward warps, forward BLOCK_T, forward
# BLOCK_D, forward warps, backward state group, backward prefetch, backward one-decay adjoint[, backward segments,
# backward register cap[, forward segments]]; see kernels.triton_scan.scan_config). The lists keep the
# winners of the H200 tunings (benchmarks/scan_tuning_h200_run*.json: run 3 compared the v2 backward with the
# one-decay one) and their nearest neighbours.
CANDIDATES = {
    (16, False): [(8, 32, 1, 4, 32, 1, 4, 0, 1), (4, 32, 1, 4, 32, 1, 4, 1, 1), (8, 32, 1, 8, 32, 1, 4, 0, 1)],
    (16, True): [(8, 32, 1, 4, 32, 1, 4, 0, 1), (8, 32, 1, 8, 32, 1, 4, 0, 1)],
    (1, False): [(4, 32, 1, 32, 32, 1, 1, 1, 1), (8, 32, 1, 32, 32, 1, 1, 1, 1, 0, 128), (4, 32, 1, 16, 32, 1, 1, 1, 1),
                 (4, 32, 1, 8, 32, 1, 1, 1, 1), (8, 32, 1, 32, 32, 1, 1, 1, 1)],
    (1, True): [(8, 32, 1, 32, 32, 1, 1, 1, 1, 0, 128), (4, 32, 1, 32, 32, 1, 1, 1, 1), (4, 32, 1, 16, 32, 1, 1, 1, 1),
                (4, 32, 1, 8, 32, 1, 1, 1, 1), (8, 32, 1, 32, 32, 1, 1, 1, 1), (4, 64, 1, 32, 32, 1, 1, 1, 1)],
}  # fmt: skip


def tune(name, batch, dim, seqlen, n, k, ku, has_z, hw, order_names, candidates=None) -> dict:
    """Time candidate block sizes (forward alone + backward) and pin the fastest for this shape class."""
    torch.manual_seed(0)
    x = make_scan_inputs(batch, seqlen, k, dim, n, ku=ku, dtype=torch.bfloat16, device="cuda", has_z=has_z)
    orders = real_orders(seqlen, hw, order_names).cuda()
    dy = torch.randn(batch, seqlen, k, dim, device="cuda", dtype=torch.bfloat16)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, orders)
    trials, reference = [], None
    for cfg in candidates or CANDIDATES[(triton.next_power_of_2(n) if n < 16 else 16, seqlen > 1024)]:
        try:
            # The forward alone (inference): timing the one that saves states picked shorter forward chunks that
            # cost the inference forward 0.39 -> 0.52 ms on VMamba-T for 0.03 ms of training time (NOTES-scan.md).
            fwd = lambda cfg=cfg: scan_fwd(*args, None, False, config=cfg)  # noqa: E731
            _, states = scan_fwd(*args, None, True, config=cfg)
            bwd = lambda cfg=cfg, states=states: scan_bwd(dy, *args, states, config=cfg)  # noqa: E731
            outs = (fwd()[0], *[g for g in bwd() if g is not None])
            if reference is None:
                reference = outs
            err = max(float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))
                      for a, b in zip(outs, reference))  # fmt: skip
            if not err < 1e-2:  # a fast but wrong candidate must never be chosen (NaN fails too)
                raise RuntimeError(f"differs from the default configuration: relative error {err:.3g}")
            t_fwd = do_bench(fwd, warmup=5, rep=30, return_mode="median")
            t_bwd = do_bench(bwd, warmup=5, rep=30, return_mode="median")
        except Exception as err:  # a candidate that does not compile or fit is skipped, not fatal
            trials.append({"config": list(cfg), "error": repr(err)[:300]})
            print(f"  tune {name}: {cfg} failed: {err!r:.200}", flush=True)
            continue
        trials.append({"config": list(cfg), "fwd_ms": t_fwd, "bwd_ms": t_bwd})
        print(f"  tune {name}: {cfg} fwd {t_fwd:.3f} bwd {t_bwd:.3f} ms", flush=True)
        del states, outs
    best = min((r for r in trials if "error" not in r), key=lambda r: r["fwd_ms"] + r["bwd_ms"])
    set_scan_config(n, seqlen, tuple(best["config"]))
    return {"name": name, "N": n, "L": seqlen, "trials": trials, "chosen": best["config"]}


def print_table(rows: list, with_mamba: bool) -> None:
    hdr = f"{'shape (B, D, L, N, K)':<42} {'ours fwd':>9} {'ours f+b':>9}"
    if with_mamba:
        hdr += (
            f" {'mamba fwd':>10} {'mamba f+b':>10} {'LM fwd':>8} {'LM f+b':>8} {'x mamba f/fb':>13} {'x LM f/fb':>11}"
        )
    hdr += f" {'ref f/fb':>17} {'bytes f/fb':>11} {'exps f/fb':>11}"
    print(hdr)
    for r in rows:
        shape = f"{r['name']} ({r['batch']}, {r['dim']}, {r['L']}, {r['N']}, {r['K']})"
        line = f"{shape:<42} {r['ours_fwd_ms']:9.3f} {r['ours_fwd_bwd_ms']:9.3f}"
        if with_mamba:
            line += (f" {r['mamba_fwd_ms']:10.3f} {r['mamba_fwd_bwd_ms']:10.3f} {r['localmamba_fwd_ms']:8.3f}"
                     f" {r['localmamba_fwd_bwd_ms']:8.3f}"
                     f" {r['speedup_vs_mamba_fwd']:6.2f}/{r['speedup_vs_mamba_fwd_bwd']:<6.2f}"
                     f" {r['speedup_vs_localmamba_fwd']:5.2f}/{r['speedup_vs_localmamba_fwd_bwd']:<5.2f}")  # fmt: skip
        ref = f"{r['ref_fwd_ms']:.1f}/{r['ref_fwd_bwd_ms']:.1f}" if "ref_fwd_ms" in r else "n/a"
        line += f" {ref:>17}"
        line += (f" {r['ours_fwd_bytes_floor_fraction']:5.2f}/{r['ours_fwd_bwd_bytes_floor_fraction']:<5.2f}"
                 f" {r['ours_fwd_exp_floor_fraction']:5.2f}/{r['ours_fwd_bwd_exp_floor_fraction']:<5.2f}")  # fmt: skip
        print(line)


def main(cfg: dict) -> dict:
    if cfg.get("configs"):
        try:
            load_scan_configs(cfg["configs"])
        except ValueError as err:
            raise SystemExit(f"error: --configs: {err}") from None
    # Build/load mamba-ssm first and alone: a source build competing with Triton compiles for the CPU ran past the
    # call's time limit once.
    with_mamba = not cfg.get("no_mamba") and try_load_mamba(cfg.get("mamba_anchor"))
    ceil = measure_ceilings()
    print(f"copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, exp2 {ceil['exp2_per_s'] / 1e12:.2f} T/s", flush=True)
    tuning, tuned_keys = [], set()
    anchors = [a for a in ANCHORS if not cfg.get("only") or cfg["only"].lower() in a[0].lower()]
    if cfg.get("tune"):
        for anchor in anchors:
            key = (triton.next_power_of_2(anchor[4]), anchor[3] > 1024)
            if key not in tuned_keys:
                tuned_keys.add(key)
                tuning.append(tune(*anchor))
                torch.cuda.empty_cache()
        if cfg.get("configs_out"):
            with open(cfg["configs_out"], "w") as f:
                json.dump([{"N": t["N"], "L": t["L"], "config": t["chosen"]} for t in tuning], f)
            with open(os.path.splitext(cfg["configs_out"])[0] + "_trials.json", "w") as f:
                json.dump({**env_info(cfg.get("commit")), "tuning": tuning}, f, indent=1)
        if cfg.get("tune_only"):
            return {"tuning": tuning}
    rows = []
    for anchor in anchors:
        t0 = time.time()
        rows.append(bench_shape(*anchor, with_mamba=with_mamba, ceil=ceil))
        rows[-1]["config"] = list(scan_config(anchor[2], anchor[4], anchor[3], torch.device("cuda")))
        print(f"  {anchor[0]} done in {time.time() - t0:.1f} s", flush=True)
        torch.cuda.empty_cache()
    vs_len = [] if cfg.get("skip_length") else bench_vs_length(with_mamba)
    conv = {}
    if rows and rows[0]["name"] == ANCHORS[0][0]:  # the LocalVim-T supernet layer: the same (batch, L, K, channels)
        conv = bench_conv(ceil)
        scan_row = rows[0]
        conv["share_of_conv_plus_scan_fwd"] = conv["triton_fwd_ms"] / (conv["triton_fwd_ms"] + scan_row["ours_fwd_ms"])
        conv["share_of_conv_plus_scan_fwd_bwd"] = conv["triton_fwd_bwd_ms"] / (
            conv["triton_fwd_bwd_ms"] + scan_row["ours_fwd_bwd_ms"]
        )
    report = {**env_info(cfg.get("commit")), "with_mamba": with_mamba, "inputs": "bf16 in, bf16 out, fp32 state",
              "ceilings": ceil, "tuning": tuning, "anchors": rows, "vs_length": vs_len, "conv1d": conv}  # fmt: skip
    if with_mamba:
        report["faster_than_localmamba_all"] = all(
            r["speedup_vs_localmamba_fwd_bwd"] > 1 and r["speedup_vs_localmamba_fwd"] > 1 for r in rows
        )
        report["at_least_2x_mamba_all"] = all(
            r["speedup_vs_mamba_fwd_bwd"] >= 2 and r["speedup_vs_mamba_fwd"] >= 2 for r in rows
        )
    out = cfg.get("out")
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    print(f"device {report['device']}, torch {report['torch']}, triton {report['triton']}, commit {report['commit']}")
    print_table(rows, with_mamba)
    if conv:
        print(
            f"conv1d share of conv + scan (LocalVim-T layer): fwd {conv['share_of_conv_plus_scan_fwd']:.1%}, "
            f"fwd+bwd {conv['share_of_conv_plus_scan_fwd_bwd']:.1%}"
        )
    return report


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/scan_<gpu>.json)")
    p.add_argument("--commit", default=None)
    p.add_argument("--mamba-anchor", default=None, help="folder with build.py that builds mamba-ssm's scan")
    p.add_argument("--no-mamba", action="store_true")
    p.add_argument("--skip-length", action="store_true")
    p.add_argument("--tune", action="store_true", help="time candidate block sizes first and use the fastest")
    p.add_argument("--configs-out", default=None, help="write the tuned block sizes to this JSON file")
    p.add_argument("--tune-only", action="store_true", help="stop after --tune (with --configs-out)")
    p.add_argument("--configs", default=None, help="use the block sizes of a --configs-out JSON file")
    p.add_argument("--only", default=None, help="tune and time only the anchor shapes whose name contains this")
    args = vars(p.parse_args())
    if args["out"] is None:
        gpu = torch.cuda.get_device_name().lower().replace("nvidia", "").split()[0]
        args["out"] = f"benchmarks/scan_{gpu}.json"
    main(args)
