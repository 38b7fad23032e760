"""Where one kernel's warps wait, from Nsight Compute's per-instruction counters (a GPU run's SASS source page).

    ncu --clock-control none --set full -k regex:_scan_bwd_nd_kernel -c 1 -o bwd python scripts/profile_scan.py ...
    ncu --import bwd.ncu-rep --page source --csv --print-source sass > bwd_sass.csv
    python scripts/ncu_summary.py bwd_sass.csv [--top 10] [--json F]

Prints the share of warp-stall samples per reason (all samples), samples and executed warp instructions per opcode,
and the instructions with the most stall samples of the leading reasons and the most excess L2 sectors (uncoalesced
accesses). Reads plain or gzipped CSV; runs anywhere (no GPU).
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import json
import os
import sys


def _rows(path: str) -> tuple[list[str], list[list[str]]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    heads = [i for i, row in enumerate(rows) if row[:2] == ["Address", "Source"]]
    if not heads:
        raise ValueError("no 'Address,Source' header row")
    if len(heads) > 1:
        raise ValueError(f"{len(heads)} kernels in one page; export one with ncu --import R -k NAME -c 1")
    header = rows[heads[0]]
    return header, [r for r in rows[heads[0] + 1 :] if len(r) >= 2]  # blank and short lines skipped


def _opcode(source: str) -> str:
    words = source.split()
    if words and words[0].startswith("@"):  # predicate
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def summarize(path: str, top: int = 10) -> dict:
    """The summary of one kernel's SASS source page (see the module docstring)."""
    header, data = _rows(path)
    col = {name: i for i, name in enumerate(header)}
    stall_cols = [h for h in header if h.startswith("stall_") and "(Not Issued)" not in h]
    if "Warp Stall Sampling (All Samples)" not in col or not stall_cols:
        raise ValueError("no warp-stall sampling columns (profile with --set full or --section SourceCounters)")

    def num(row: list[str], name: str) -> float:
        value = row[col[name]] if name in col and col[name] < len(row) else ""
        return float(value.replace(",", "")) if value.strip() else 0.0

    samples = sum(num(r, "Warp Stall Sampling (All Samples)") for r in data) or 1.0
    reasons = collections.Counter({c[len("stall_") :]: sum(num(r, c) for r in data) for c in stall_cols})
    reason_total = sum(reasons.values()) or 1.0
    by_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for r in data:
        entry = by_op[_opcode(r[col["Source"]])]
        entry[0] += num(r, "Warp Stall Sampling (All Samples)")
        entry[1] += num(r, "Instructions Executed")
    leading = [name for name, _ in reasons.most_common(3)]

    def inst(r: list[str], **extra) -> dict:
        return {"address": r[col["Address"]], "source": " ".join(r[col["Source"]].split()), **extra}

    excess = "L2 Theoretical Sectors Global Excessive"
    return {
        "file": os.path.basename(path),
        "instructions": len(data),
        "samples": samples,
        "executed": sum(v[1] for v in by_op.values()),
        "stall_share": {k: v / reason_total for k, v in reasons.most_common() if v > 0},
        "opcodes": [
            {"opcode": op, "sample_share": v[0] / samples, "executed": v[1]}
            for op, v in sorted(by_op.items(), key=lambda kv: -kv[1][0])
        ],
        "top_stalled": {
            reason: [
                inst(r, samples=num(r, f"stall_{reason}"))
                for r in sorted(data, key=lambda r: -num(r, f"stall_{reason}"))[:top]
                if num(r, f"stall_{reason}") > 0
            ]
            for reason in leading
        },
        "top_excess_sectors": [
            inst(r, sectors=num(r, "L2 Theoretical Sectors Global"), excess=num(r, excess))
            for r in sorted(data, key=lambda r: -num(r, excess))[:top]
            if num(r, excess) > 0
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", help="ncu --page source --csv --print-source sass output (.csv or .csv.gz)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    try:
        s = summarize(args.csv, args.top)
    except FileNotFoundError:
        print(
            f"error: {args.csv} not found; export one with ncu --page source --csv --print-source sass", file=sys.stderr
        )
        return 2
    except (ValueError, OSError, csv.Error) as err:
        print(f"error: {args.csv} is not an ncu SASS source page ({err}); see this script's --help", file=sys.stderr)
        return 2
    print(f"{s['file']}: {s['instructions']} instructions, {s['executed']:.4g} executed, {s['samples']:.0f} samples")
    print("stall reasons: " + ", ".join(f"{k} {v:.1%}" for k, v in list(s["stall_share"].items())[:8]))
    print(f"{'opcode':<10} {'samples':>8} {'executed':>12}")
    for o in s["opcodes"][: max(args.top, 12)]:
        print(f"{o['opcode']:<10} {o['sample_share']:8.1%} {o['executed']:12.4g}")
    for reason, rows in s["top_stalled"].items():
        print(f"most {reason} samples:")
        for r in rows[:5]:
            print(f"  {r['samples']:8.0f}  {r['source']}")
    if s["top_excess_sectors"]:
        print("most excess L2 sectors (sectors, excess):")
        for r in s["top_excess_sectors"][:8]:
            print(f"  {r['sectors']:10.0f} {r['excess']:10.0f}  {r['source']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
