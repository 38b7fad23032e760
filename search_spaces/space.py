"""Search spaces: candidate scan orders, how many to keep per layer, and constraints."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import yaml

from .orders import is_global_order, parse_order_name

__all__ = ["SearchSpace", "list_presets", "load_space", "select_top_k"]

_SPACE_KEYS = ("name", "candidates", "k", "min_global")


def _one_line_error(msg: str) -> ValueError:
    return ValueError(" ".join(msg.split()))


@dataclass(frozen=True)
class SearchSpace:
    """A search space over scan orders.

    Attributes:
        name: preset or user name.
        candidates: order names, in a fixed order that every per-layer probability vector follows.
        k: orders kept per layer at derivation (1 <= k <= len(candidates)).
        min_global: at least this many global orders (h, v, zh, zv and flips) among the k kept per layer.
    """

    name: str
    candidates: tuple[str, ...]
    k: int
    min_global: int = 0
    global_mask: tuple[bool, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cands = tuple(self.candidates)
        object.__setattr__(self, "candidates", cands)
        if not cands:
            raise _one_line_error(f"search space '{self.name}': candidates is empty; list at least one scan order")
        for c in cands:
            try:
                parse_order_name(c)
            except ValueError as e:
                raise _one_line_error(f"search space '{self.name}': {e}") from None
        dupes = sorted({c for c in cands if cands.count(c) > 1})
        if dupes:
            raise _one_line_error(f"search space '{self.name}': duplicate candidates {dupes}; list each order once")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or not 1 <= self.k <= len(cands):
            raise _one_line_error(
                f"search space '{self.name}': k={self.k!r} is out of range; use an integer in 1..{len(cands)}"
            )
        mask = tuple(is_global_order(c) for c in cands)
        object.__setattr__(self, "global_mask", mask)
        n_global = sum(mask)
        bad = not isinstance(self.min_global, int) or isinstance(self.min_global, bool)
        if bad or not 0 <= self.min_global <= min(self.k, n_global):
            raise _one_line_error(
                f"search space '{self.name}': min_global={self.min_global!r} is out of range; use "
                f"0..{min(self.k, n_global)} (k={self.k}, {n_global} global candidates)"
            )

    @property
    def num_candidates(self) -> int:
        return len(self.candidates)

    def index(self, order: str) -> int:
        try:
            return self.candidates.index(order)
        except ValueError:
            raise _one_line_error(
                f"order '{order}' is not a candidate of search space '{self.name}' ({', '.join(self.candidates)})"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "candidates": list(self.candidates), "k": self.k, "min_global": self.min_global}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "search space") -> SearchSpace:
        if not isinstance(d, dict):
            raise _one_line_error(f"{source}: expected a mapping with keys {list(_SPACE_KEYS)}, got {type(d).__name__}")
        for key in d:
            if key not in _SPACE_KEYS:
                near = difflib.get_close_matches(str(key), _SPACE_KEYS, n=1)
                hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(_SPACE_KEYS)}"
                raise _one_line_error(f"{source}: unknown key '{key}'{hint}")
        for key in ("candidates", "k"):
            if key not in d:
                raise _one_line_error(f"{source}: missing key '{key}'")
        cands = d["candidates"]
        if not isinstance(cands, (list, tuple)):
            raise _one_line_error(f"{source}: 'candidates' must be a list of order names, got {type(cands).__name__}")
        return cls(
            name=str(d.get("name", Path(source).stem)),
            candidates=tuple(str(c) for c in cands),
            k=d["k"],
            min_global=d.get("min_global", 0),
        )

    def validate_choice(self, orders: Sequence[str], where: str = "layer") -> None:
        """Check that ``orders`` is a valid per-layer choice: k distinct candidates meeting the constraint."""
        for o in orders:
            self.index(o)
        if len(set(orders)) != len(orders):
            raise _one_line_error(f"{where}: repeated orders in {list(orders)}")
        if len(orders) != self.k:
            raise _one_line_error(
                f"{where}: {len(orders)} orders chosen but search space '{self.name}' keeps k={self.k}"
            )
        n_global = sum(is_global_order(o) for o in orders)
        if n_global < self.min_global:
            raise _one_line_error(
                f"{where}: {n_global} global orders chosen, search space '{self.name}' needs at least {self.min_global}"
            )


def list_presets() -> list[str]:
    """Names of the bundled YAML presets."""
    root = resources.files("search_spaces") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_space(spec: str | Path | dict[str, Any] | SearchSpace) -> SearchSpace:
    """Load a search space from a preset name, a YAML path, a dict, or pass a :class:`SearchSpace` through."""
    if isinstance(spec, SearchSpace):
        return spec
    if isinstance(spec, dict):
        return SearchSpace.from_dict(spec)
    spec_str = str(spec)
    if spec_str in list_presets():
        text = (resources.files("search_spaces") / "presets" / f"{spec_str}.yaml").read_text()
        return SearchSpace.from_dict(yaml.safe_load(text), source=f"preset '{spec_str}'")
    path = Path(spec_str)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise _one_line_error(f"search space file not found: {path.resolve()}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise _one_line_error(f"search space file {path}: not valid YAML ({e})") from None
        except UnicodeDecodeError:
            raise _one_line_error(f"search space file {path}: not a text file; pass a search space YAML") from None
        return SearchSpace.from_dict(data, source=str(path))
    near = difflib.get_close_matches(spec_str, list_presets(), n=1)
    hint = f"did you mean '{near[0]}'? " if near else ""
    raise _one_line_error(
        f"unknown search space '{spec_str}'; {hint}presets: {', '.join(list_presets())}, or give a YAML file path"
    )


def select_top_k(space: SearchSpace, probs: Sequence[float]) -> list[str]:
    """The k most probable candidates that satisfy the space's constraint, in candidate order.

    Ties break toward the earlier candidate, so the result is deterministic for given probabilities.
    """
    if len(probs) != space.num_candidates:
        raise _one_line_error(
            f"got {len(probs)} probabilities for search space '{space.name}' with {space.num_candidates} candidates"
        )
    ranked = sorted(range(space.num_candidates), key=lambda i: (-float(probs[i]), i))
    chosen: list[int] = []
    # Reserve room for the required global orders: take the best globals first, then fill by probability.
    globals_ranked = [i for i in ranked if space.global_mask[i]]
    chosen.extend(globals_ranked[: space.min_global])
    for i in ranked:
        if len(chosen) == space.k:
            break
        if i not in chosen:
            chosen.append(i)
    return [space.candidates[i] for i in sorted(chosen)]
