"""``python -m search_spaces list`` | ``python -m search_spaces show NAME --size HxW``."""

from __future__ import annotations

import argparse
import sys

from .orders import ORDER_PATTERNS, order_grid
from .space import list_presets, load_space

_MAX_SIDE = 512  # a printed grid a person can still read (and build in a blink)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 4x6 (rows x columns), got '{text}'") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got '{text}'")
    if max(h, w) > _MAX_SIDE:
        raise argparse.ArgumentTypeError(
            f"size '{text}' is too large to print (at most {_MAX_SIDE} per side); orders of any size come from "
            f"search_spaces.scan_order(name, H, W) in Python"
        )
    return h, w


def format_grid(name: str, height: int, width: int) -> str:
    """The grid with each cell's visit step, aligned in columns."""
    steps = order_grid(name, height, width)
    cell = len(str(height * width - 1))
    lines = [" ".join(f"{int(s):>{cell}d}" for s in row) for row in steps]
    return "\n".join(lines)


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), like every other CLI of the project."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message}; see python -m search_spaces --help\n")


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(prog="python -m search_spaces", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="presets and order name patterns")
    show = sub.add_parser("show", help="print the grid with each cell's visit step")
    show.error = parser.error  # type: ignore[method-assign]
    show.add_argument("name", help="order name, e.g. w2, v_flip, wv3")
    show.add_argument("--size", type=_parse_size, default=(4, 6), help="HxW grid, default 4x6")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "list":
            print("presets:")
            for p in list_presets():
                s = load_space(p)
                extra = f", at least {s.min_global} global" if s.min_global else ""
                print(f"  {p:<11} k={s.k}{extra}: {' '.join(s.candidates)}")
            print("order names (any of these, optionally with '_flip' = reversed):")
            for key, pat in ORDER_PATTERNS.items():
                print(f"  {key:<6} {pat.doc}")
        else:
            h, w = args.size
            grid = format_grid(args.name, h, w)  # a bad name fails here, before anything is printed
            print(f"{args.name} on {h}x{w}: cell = step at which the scan visits it")
            print(grid)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
