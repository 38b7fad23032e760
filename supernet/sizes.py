"""Parameters and FLOPs of every entrypoint: ``python -m supernet.sizes [--filter GLOB] [--json PATH]``.

FLOPs of one image at the entrypoint's default input size, in eval mode (a supernet in ``softmax`` mode computes
every order), counted by :func:`supernet.count_params_flops` in the convention of the published tables
(multiply-adds, and VMamba's rule for the scan), next to the published figures where there are some.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from typing import Sequence

import timm
import torch
import torch.nn as nn

from .derive import derive_arch, list_models
from .flops import count_params_flops

__all__ = ["PUBLISHED", "main", "size_table"]

# Published (params, GFLOPs) of the ImageNet models these entrypoints reproduce.
PUBLISHED: dict[str, tuple[float, float]] = {
    "vim_tiny": (7e6, 1.5),
    "vim_small": (26e6, 5.1),
    "vmamba_tiny": (30e6, 4.9),
    "local_vim_tiny": (8e6, 1.5),
}


def _build(name: str, all_names: Sequence[str]) -> nn.Module:
    if f"{name}_search" in all_names:
        # A derived entrypoint: every arch of the right depth has the same size, so take the supernet's top-k.
        torch.manual_seed(0)
        return timm.create_model(name, arch=derive_arch(timm.create_model(f"{name}_search")))
    return timm.create_model(name)


def size_table(names: Sequence[str]) -> list[dict]:
    """One row per entrypoint: name, input size, params, GFLOPs, and the published figures if any."""
    rows = []
    all_names = list_models()
    for name in names:
        model = _build(name, all_names)
        chans, height, width = model.pretrained_cfg["input_size"]
        params, flops = count_params_flops(model, (height, width), chans)
        pub = PUBLISHED.get(name)
        rows.append(
            {
                "model": name,
                "input": f"{chans}x{height}x{width}",
                "params_M": round(params / 1e6, 3),
                "GFLOPs": round(flops / 1e9, 3),
                "published_params_M": None if pub is None else pub[0] / 1e6,
                "published_GFLOPs": None if pub is None else pub[1],
                "params_vs_published": None if pub is None else round(params / pub[0] - 1.0, 4),
            }
        )
        del model
    return rows


def _format(rows: list[dict]) -> str:
    head = f"{'model':<26} {'input':>10} {'params (M)':>11} {'GFLOPs':>9} {'published':>16} {'Δparams':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        pub = "" if r["published_params_M"] is None else f"{r['published_params_M']:g}M/{r['published_GFLOPs']:g}G"
        delta = "" if r["params_vs_published"] is None else f"{100 * r['params_vs_published']:+.1f}%"
        lines.append(
            f"{r['model']:<26} {r['input']:>10} {r['params_M']:>11.3f} {r['GFLOPs']:>9.3f} {pub:>16} {delta:>8}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--filter", default="*", help="glob over entrypoint names (default: all)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    names = [n for n in list_models() if fnmatch.fnmatch(n, args.filter)]
    if not names:
        parser.error(f"no entrypoint matches {args.filter!r}")
    rows = size_table(names)
    print(_format(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
