"""The arch file: which scan orders each layer of a derived model uses.

Schema (YAML, ``format_version: 1``)::

    format_version: 1
    model: local_vim_tiny            # derived entrypoint that builds this arch (timm name)
    space: {name: localmamba, candidates: [h, h_flip, ...], k: 4, min_global: 0}
    layers:                          # one entry per searchable layer, in model order
      - label: blocks.0              # stable layer label (see model.arch_probs()); optional
        orders: [h, h_flip, w2, w2_flip]   # the k chosen orders, in candidate order
        probs: [0.14, 0.13, ...]     # probability of every candidate at derivation (optional for hand-written files)
      - [h, h_flip, w2, w2_flip]     # shorthand for hand-written files: the orders alone, no label
    provenance: {checkpoint: ..., epoch: ..., commit: ..., date: ...}

A labelled layer must carry the label of the model's layer at its position; an unlabelled one (the shorthand, or a
mapping without ``label``) is matched to the model's layers by position alone, so only the depth has to agree.

Derivation writes it, derived models are built from it and retraining reads it; it is defined only here.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import yaml

from .space import SearchSpace, load_space

__all__ = ["ARCH_FORMAT_VERSION", "ArchSpec", "LayerChoice", "load_arch", "save_arch"]

ARCH_FORMAT_VERSION = 1
_TOP_KEYS = ("format_version", "model", "space", "layers", "provenance")
_LAYER_KEYS = ("label", "orders", "probs")


def _err(msg: str) -> ValueError:
    return ValueError(" ".join(msg.split()))


def _check_keys(d: dict, valid: Sequence[str], where: str) -> None:
    for key in d:
        if key not in valid:
            near = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(valid)}"
            raise _err(f"{where}: unknown key '{key}'{hint}")


@dataclass(frozen=True)
class LayerChoice:
    """The orders one layer keeps. ``probs`` follows the space's candidate order (empty when unknown); ``label`` is
    None for a layer that is matched to the model's layers by position."""

    label: str | None
    orders: tuple[str, ...]
    probs: tuple[float, ...] = ()


@dataclass(frozen=True)
class ArchSpec:
    """A derived architecture: per-layer scan orders drawn from one search space."""

    space: SearchSpace
    layers: tuple[LayerChoice, ...]
    model: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        layers = []
        for i, layer in enumerate(self.layers):
            where = f"arch layer {i}" if layer.label is None else f"arch layer {i} ('{layer.label}')"
            self.space.validate_choice(layer.orders, where=where)
            if layer.probs and len(layer.probs) != self.space.num_candidates:
                raise _err(
                    f"{where}: {len(layer.probs)} probabilities for {self.space.num_candidates} candidates of "
                    f"space '{self.space.name}'"
                )
            # Orders are kept in candidate order so that equal choices compare (and build) equal.
            orders = tuple(sorted(layer.orders, key=self.space.index))
            layers.append(LayerChoice(layer.label, orders, tuple(layer.probs)))
        object.__setattr__(self, "layers", tuple(layers))

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def orders(self) -> list[list[str]]:
        return [list(layer.orders) for layer in self.layers]

    def check_compatible(self, labels: Sequence[str], space: SearchSpace | None = None, model: str = "model") -> None:
        """Refuse an arch whose layer count/labels or space do not match a model. Unlabelled layers match by position.

        Args:
            labels: the model's searchable layer labels, in order.
            space: the model's search space, if it has one (candidates must match).
            model: name used in the error message.
        """
        if len(labels) != self.depth:
            raise _err(
                f"arch file has {self.depth} layers but {model} has {len(labels)} searchable layers; derive the arch "
                f"from a supernet of the same depth or pick the matching model"
            )
        for i, (mine, theirs) in enumerate(zip([layer.label for layer in self.layers], labels)):
            if mine is not None and mine != theirs:
                raise _err(f"arch layer {i} is labelled '{mine}' but {model} layer {i} is '{theirs}'")
        if space is not None and tuple(space.candidates) != tuple(self.space.candidates):
            raise _err(
                f"arch file uses space '{self.space.name}' ({', '.join(self.space.candidates)}) but {model} searches "
                f"'{space.name}' ({', '.join(space.candidates)})"
            )

    def with_labels(self, labels: Sequence[str]) -> ArchSpec:
        """This arch with each unlabelled layer given the label at its position in ``labels`` (a model's labels, after
        :meth:`check_compatible`); labelled layers are kept as they are."""
        if len(labels) != self.depth:
            raise _err(f"with_labels: {len(labels)} labels for an arch of {self.depth} layers")
        layers = tuple(
            layer if layer.label is not None else replace(layer, label=str(label))
            for layer, label in zip(self.layers, labels)
        )
        return replace(self, layers=layers)

    def to_dict(self) -> dict[str, Any]:
        layers = []
        for layer in self.layers:
            entry: dict[str, Any] = {} if layer.label is None else {"label": layer.label}
            entry["orders"] = list(layer.orders)
            if layer.probs:
                entry["probs"] = [round(float(p), 6) for p in layer.probs]
            layers.append(entry)
        out: dict[str, Any] = {"format_version": ARCH_FORMAT_VERSION}
        if self.model:
            out["model"] = self.model
        out["space"] = self.space.to_dict()
        out["layers"] = layers
        out["provenance"] = dict(self.provenance)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "arch") -> ArchSpec:
        if not isinstance(d, dict):
            raise _err(f"{source}: expected a mapping with keys {list(_TOP_KEYS)}, got {type(d).__name__}")
        _check_keys(d, _TOP_KEYS, source)
        version = d.get("format_version")
        if version != ARCH_FORMAT_VERSION:
            raise _err(
                f"{source}: format_version {version!r} is not supported (this version reads {ARCH_FORMAT_VERSION}); "
                f"derive the arch again with nas.vis_search_prob"
            )
        if "space" not in d or "layers" not in d:
            raise _err(f"{source}: needs 'space' and 'layers'")
        space_spec = d["space"]
        space = load_space(space_spec) if isinstance(space_spec, str) else SearchSpace.from_dict(space_spec, source)
        raw_layers = d["layers"]
        if not isinstance(raw_layers, list) or not raw_layers:
            raise _err(f"{source}: 'layers' must be a non-empty list")
        layers = []
        for i, entry in enumerate(raw_layers):
            if isinstance(entry, (list, tuple)):  # shorthand: a bare list of orders, matched by position
                entry = {"orders": entry}
            if not isinstance(entry, dict) or "orders" not in entry:
                raise _err(
                    f"{source}: layer {i} must be a list of orders or a mapping with 'orders' (and optionally 'label', "
                    f"'probs')"
                )
            _check_keys(entry, _LAYER_KEYS, f"{source} layer {i}")
            if not isinstance(entry["orders"], (list, tuple)):  # a string would be read letter by letter
                raise _err(
                    f"{source}: layer {i}: 'orders' must be a list of order names, e.g. [h, h_flip, w2, w2_flip], "
                    f"got {entry['orders']!r}"
                )
            label = entry.get("label")
            layers.append(
                LayerChoice(
                    label=None if label is None else str(label),
                    orders=tuple(str(o) for o in entry["orders"]),
                    probs=tuple(float(p) for p in entry.get("probs", ()) or ()),
                )
            )
        return cls(space=space, layers=tuple(layers), model=d.get("model"), provenance=dict(d.get("provenance") or {}))


def load_arch(spec: str | Path | dict[str, Any] | ArchSpec) -> ArchSpec:
    """Load an arch from a YAML path, a dict, or pass an :class:`ArchSpec` through.

    Raises:
        TypeError: ``spec`` is none of these (a bare list of per-layer orders names no space: put it in a dict).
        ValueError: the file is missing or not valid YAML, or the arch is malformed.
    """
    if isinstance(spec, ArchSpec):
        return spec
    if isinstance(spec, dict):
        return ArchSpec.from_dict(spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(
            f"arch must be an arch YAML path, a dict or an ArchSpec, got {type(spec).__name__}; for per-layer orders "
            f"pass {{'format_version': {ARCH_FORMAT_VERSION}, 'space': NAME, 'layers': [[order, ...], ...]}}"
        )
    path = Path(spec)
    if not path.is_file():
        raise _err(f"arch file not found: {path.resolve()}; derive one with `python -m nas.vis_search_prob RUN_DIR`")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise _err(f"arch file {path}: not valid YAML ({e})") from None
    except UnicodeDecodeError:
        raise _err(
            f"arch file {path}: not a text file (a checkpoint or an image?); pass the arch YAML that "
            f"`python -m nas.vis_search_prob RUN_DIR --out arch.yaml` writes"
        ) from None
    return ArchSpec.from_dict(data, source=f"arch file {path}")


_UMASK = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it)
os.umask(_UMASK)


def save_arch(arch: ArchSpec, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``arch`` as YAML atomically (temporary file, then rename). Refuses to overwrite unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise _err(f"{path.resolve()} exists; choose another --out or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600, as open() would make it under the umask
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(arch.to_dict(), f, sort_keys=False, default_flow_style=None, width=120)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a folder at path, a full disk, Ctrl-C: no temporary file left behind
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
