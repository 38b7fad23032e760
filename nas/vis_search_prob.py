"""Derive the searched architecture from a supernet run: the arch file, a heatmap, probability trajectories.

``python -m nas.vis_search_prob RUN_DIR_OR_CHECKPOINT [--k K] [--out arch.yaml] [--overwrite]``

Every searchable layer's candidate probabilities are read from the search checkpoint (softmax of the layer's
``arch_logits``, through the model's own ``arch_probs()``), or from the last line of ``arch_probs.jsonl`` when only
that file is given. Each layer keeps the top k orders that the search space and its constraint allow
(:func:`search_spaces.select_top_k`), and the result is written as an arch file that ``retrain.train --arch`` reads
directly, next to two plots:

* ``<out>_heatmap.png``: layers × candidates, the chosen cells outlined;
* ``<out>_trajectory.png``: every layer's probabilities over the search epochs (from ``arch_probs.jsonl``).

The same checkpoint always gives the same files: ties break toward the earlier candidate and the provenance date is the
checkpoint's, not the clock's. None of the three files is replaced without ``--overwrite``: an existing one stops the
run before anything is written. ``--out`` names the arch file, not a folder; a folder it needs is created. The files are
written to temporary ones and put in place together, so a failed run leaves nothing behind. A run whose arch logits
never moved (it stopped within its arch warm-up) still gives files, with a warning on stderr: its arch is initialization
noise, not a search result.

The printed retrain command carries the settings that fix the derived model, its token grid and the data over from the
search (see :func:`retrain_command`).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shlex
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any, Sequence

import yaml

from retrain.checkpoint import RUN_FILES, first_sentence
from retrain.config import FILE_MODE, OneLineArgumentParser, nearest_flag, one_line, one_line_warning
from retrain.engine import git_commit
from search_spaces import ArchSpec, LayerChoice, SearchSpace, list_presets, load_space, save_arch, select_top_k

__all__ = ["DEFAULTS", "derive", "main", "read_arch_probs_jsonl"]

DEFAULTS: dict[str, Any] = {
    "source": "",  # a run directory, a search checkpoint (.pt) or an arch_probs.jsonl
    "k": None,  # orders kept per layer; None: the search space's k
    "out": None,  # arch file path; None: <run dir>/arch.yaml
    "overwrite": False,
    "plots": True,
    "quiet": False,
}

_CHECKPOINT_NAMES = ("last.pt", "best.pt")
_JSONL_NAME = "arch_probs.jsonl"

# SLWS P_max of the printed retrain command: the value the README's retrain step and the demo use.
RETRAIN_SHUFFLE_MAX = 0.1

# Supernet constructor arguments a derived child has no use for: its arch file takes their place.
_SEARCH_ONLY_KWARGS = ("space", "mix", "derived_model_name", "orders", "arch")

# Probabilities within this relative distance of 1/K count as uniform. The logits start at 1e-3 * randn, so untouched
# probabilities sit within ~5e-3 of 1/K.
_UNIFORM_RTOL = 1e-2


class DerivationError(ValueError):
    """A user-facing derivation problem; the message is one line."""

    def __init__(self, msg: str) -> None:
        super().__init__(one_line(msg))


# ----------------------------------------------------------------------------------------------------------------------
# Inputs


def _resolve_source(source: str | Path) -> tuple[Path, Path | None, Path | None]:
    """Split the user's argument into (run dir, checkpoint or None, arch_probs.jsonl or None)."""
    path = Path(source).expanduser()
    if not str(source):
        raise DerivationError("give a search run directory, a search checkpoint (.pt) or an arch_probs.jsonl")
    if not path.exists():
        raise DerivationError(f"not found: {path.resolve()}; give a search run directory or its last.pt")
    if path.is_dir():
        run_dir = path
        ckpt = next((run_dir / n for n in _CHECKPOINT_NAMES if (run_dir / n).is_file()), None)
        jsonl = run_dir / _JSONL_NAME if (run_dir / _JSONL_NAME).is_file() else None
        if ckpt is None and jsonl is None:
            if _is_search_run(run_dir):
                # nas.search writes args.yaml (and tb/) at its start, but its first checkpoint and jsonl line only
                # when an epoch ends: this is a search that is still in its first epoch, or was killed in it.
                raise DerivationError(
                    f"the search in {path.resolve()} has not finished an epoch yet (no "
                    f"{', '.join(_CHECKPOINT_NAMES)} or {_JSONL_NAME}); wait for its first epoch to end, or, if it was "
                    f"stopped, run its nas.search command again with --resume auto"
                )
            raise DerivationError(
                f"{path.resolve()} holds neither a search checkpoint ({' or '.join(_CHECKPOINT_NAMES)}) nor "
                f"{_JSONL_NAME}; is it the output directory of `python -m nas.search`?"
            )
        return run_dir, ckpt, jsonl
    run_dir = path.parent
    jsonl_beside = run_dir / _JSONL_NAME if (run_dir / _JSONL_NAME).is_file() else None
    if path.suffix == ".jsonl":
        return run_dir, None, path
    return run_dir, path, jsonl_beside


def _is_search_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds the args.yaml of a nas.search run (a retrain.train one has no arch settings)."""
    args = run_dir / "args.yaml"
    if not args.is_file():
        return False
    try:
        cfg = yaml.safe_load(args.read_text())
    except yaml.YAMLError:
        return False
    return isinstance(cfg, dict) and "arch_warmup_epochs" in cfg


_JSON_KINDS = {int: "number", float: "number", str: "string", list: "array", bool: "boolean", type(None): "null"}


def read_arch_probs_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read ``arch_probs.jsonl``: one ``{"epoch", "labels", "candidates", "probs"}`` record per search epoch.

    A truncated last line (a run killed while writing) is skipped; any other malformed line is an error.

    Returns:
        The records in file order, ``probs`` as ``(layers, candidates)`` nested lists.
    """
    path = Path(path)
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1 and records:
                break
            raise DerivationError(f"{path}: line {i + 1} is not valid JSON") from None
        if not isinstance(rec, dict):  # valid JSON, but a bare number, string or list is no epoch's record
            kind = _JSON_KINDS.get(type(rec), type(rec).__name__)
            raise DerivationError(
                f"{path}: line {i + 1} is a JSON {kind}, not a record; each line must be an object with epoch, labels, "
                f"candidates and probs, as nas.search writes it"
            )
        missing = [k for k in ("epoch", "labels", "candidates", "probs") if k not in rec]
        if missing:
            raise DerivationError(f"{path}: line {i + 1} lacks {', '.join(missing)}")
        shape = [rec[k] for k in ("labels", "candidates", "probs")]
        if not all(isinstance(v, list) for v in shape) or not all(isinstance(p, list) for p in rec["probs"]):
            raise DerivationError(f"{path}: line {i + 1}: labels, candidates and probs must be lists")
        if len(rec["probs"]) != len(rec["labels"]) or any(len(p) != len(rec["candidates"]) for p in rec["probs"]):
            raise DerivationError(f"{path}: line {i + 1}: probs are not {len(rec['labels'])} layers × candidates")
        records.append(rec)
    if not records:
        raise DerivationError(f"{path} has no records; the search wrote no epoch yet")
    return records


def _space_from_candidates(candidates: Sequence[str], run_dir: Path) -> SearchSpace:
    """Find the search space of a run known only through its jsonl: the space stored in the search checkpoint beside
    it (exactly what the run searched), else the run's args.yaml, else a matching preset."""
    stored = _space_beside(candidates, run_dir)
    if stored is not None:  # args.yaml's path may resolve here to another file than the one the search read
        return stored
    args = run_dir / "args.yaml"
    if args.is_file():
        cfg = yaml.safe_load(args.read_text()) or {}
        for key in ("search_space", "space"):
            spec = cfg.get(key)
            if spec:
                try:
                    space = load_space(spec)
                except ValueError as e:
                    # args.yaml records the space as the search was given it, so a relative path resolves only where
                    # the search ran. No preset stands in: one with the same candidates may keep another k or
                    # constraint.
                    raise DerivationError(
                        f"cannot tell the search space of the run: {args} names '{spec}' but {e}; "
                        f"{_space_path_advice(spec)}, or pass the run's last.pt (it stores the space itself)"
                    ) from None
                if tuple(space.candidates) == tuple(candidates):
                    return space
    for name in list_presets():
        space = load_space(name)
        if tuple(space.candidates) == tuple(candidates):
            return space
    raise DerivationError(
        f"cannot tell the search space of candidates {list(candidates)}: no args.yaml beside {run_dir} names it and "
        f"no preset matches; pass the run's last.pt instead"
    )


def _space_beside(candidates: Sequence[str], run_dir: Path) -> SearchSpace | None:
    """The search space stored in the run's own checkpoint (last.pt, else best.pt) when it has these candidates; None
    when no readable search checkpoint beside the jsonl stores one."""
    from retrain.checkpoint import CheckpointError, load_checkpoint

    for name in _CHECKPOINT_NAMES:
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            space = _stored_space(load_checkpoint(path, expect_kind="search"))
        except CheckpointError:
            continue
        if space is not None and tuple(space.candidates) == tuple(candidates):
            return space
    return None


def _space_path_advice(spec: Any) -> str:
    """What to do about a search space path, recorded by a search, that does not load from here."""
    if isinstance(spec, str) and not Path(spec).expanduser().is_absolute():
        return f"run this from the directory the search ran in, where '{spec}' resolves"
    return f"put the search space file back at {spec}"


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a search checkpoint and compute every layer's probabilities with the model that wrote it.

    The model is rebuilt from the name and kwargs the checkpoint records and asked for ``arch_probs()``: the layer
    labels and the softmax then come from the one place that defines them, never from state-dict key matching.
    """
    import torch

    import supernet  # noqa: F401  (registers the timm entrypoints)
    from retrain.checkpoint import CheckpointError, load_checkpoint

    try:
        ckpt = load_checkpoint(path, expect_kind="search")
    except CheckpointError as e:
        if e.unreadable and not _may_be_checkpoint(path):
            raise DerivationError(_not_a_checkpoint(path)) from None
        advice = f"; {_other_sources(path)}" if e.unreadable else ""  # not for another kind or model's checkpoint
        raise DerivationError(f"{_checkpoint_problem(path, e)}{advice}") from None
    from retrain.train import model_from_spec

    spec = ckpt.get("model_spec") or {}
    model_name = spec.get("name") or ckpt.get("model")
    if not spec or "state_dict" not in ckpt:
        raise DerivationError(
            f"{path}: a search checkpoint without model_spec/state_dict; was it written by nas.search?"
        )
    stored_space = _stored_space(ckpt)
    kwargs = spec.get("kwargs") or {}
    if stored_space is not None and "space" in kwargs:
        # The spec holds the space as the search was given it, often a path relative to where the search ran; the
        # space itself is stored too, and rebuilding from it works from any directory (and cannot pick up another
        # file that happens to have that path here).
        spec = {**spec, "kwargs": {**kwargs, "space": stored_space.to_dict()}}
    try:
        model = model_from_spec(spec)
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        given = kwargs.get("space")
        advice = ""
        if (
            stored_space is None
            and isinstance(given, str)
            and given not in list_presets()
            and not Path(given).is_file()
        ):
            advice = f"; the checkpoint stores no usable search space, only its path: {_space_path_advice(given)}"
        raise DerivationError(f"{path}: cannot rebuild {model_name} from the checkpoint ({e}){advice}") from None
    if not hasattr(model, "arch_probs"):
        raise DerivationError(f"{path}: {model_name} is not a search model (no arch_probs()); give a search run")
    with torch.no_grad():
        probs_by_label = model.arch_probs()
    labels = list(probs_by_label)
    probs = [[float(p) for p in torch.as_tensor(probs_by_label[lab]).tolist()] for lab in labels]
    space = load_space(stored_space or getattr(model, "search_space", None))
    model_space = getattr(model, "search_space", None)
    # The probabilities follow the model's candidate order: a stored space in another order would mislabel them.
    if model_space is not None and tuple(model_space.candidates) != tuple(space.candidates):
        raise DerivationError(
            f"{path}: the checkpoint's search space '{space.name}' ({', '.join(space.candidates)}) does not match "
            f"the rebuilt {model_name}'s ({', '.join(model_space.candidates)}); was it written by this nas.search?"
        )
    return {
        "labels": labels,
        "probs": probs,
        "space": space,
        "model": ckpt.get("derived_model_name") or getattr(model, "derived_model_name", None),
        "epoch": ckpt.get("epoch"),
        "mid_epoch_step": _mid_epoch_step(ckpt),
        "commit": ckpt.get("commit"),
        "date": ckpt.get("date"),
        "config": ckpt.get("config") or {},
        "arch_steps": _arch_steps(ckpt),
    }


def _stored_space(ckpt: dict[str, Any]) -> SearchSpace | None:
    """The search space a checkpoint stores whole (``search_space``), or None where it stores none that loads."""
    stored = ckpt.get("search_space")
    if not isinstance(stored, dict):
        return None
    try:
        return SearchSpace.from_dict(stored)
    except ValueError:
        return None


def _mid_epoch_step(ckpt: dict[str, Any]) -> int | None:
    """The step of a checkpoint written within an epoch (a signal, ``--checkpoint-interval``); None at an epoch end.

    nas.search records where a resumed run goes on: ``next_epoch`` past ``epoch`` at an epoch's end, the same epoch
    and ``next_batch`` > 0 within it, whose logits then moved only part of that epoch.
    """
    next_batch, next_epoch = ckpt.get("next_batch"), ckpt.get("next_epoch")
    if not next_batch or next_epoch is None or next_epoch != ckpt.get("epoch"):
        return None
    return int(ckpt.get("step") or 0)


# Leading bytes of what torch.save writes: a zip archive, or (the legacy format) a pickle of protocol 2 or above.
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def _may_be_checkpoint(path: Path) -> bool:
    """Whether an unloadable file was meant as a checkpoint (then it is damaged) rather than some other file."""
    if path.suffix.lower() in _CHECKPOINT_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return True
    return head.startswith(_TORCH_MAGIC)


def _not_a_checkpoint(path: Path) -> str:
    """Say what to pass instead of a file that is no checkpoint (an arch.yaml, summary.csv, a plot)."""
    run = path.parent
    beside = any((run / n).is_file() for n in (*_CHECKPOINT_NAMES, _JSONL_NAME))
    hint = f", e.g. {run.resolve()}" if beside else ""
    return (
        f"{path.resolve()} is not a search checkpoint; give a search run directory{hint}, its "
        f"{' or '.join(_CHECKPOINT_NAMES)}, or its {_JSONL_NAME}"
    )


def _checkpoint_problem(path: Path, e: Exception) -> str:
    """What is wrong with an unreadable checkpoint, without the trainers' resume advice (this tool does not resume)."""
    cause = e.__context__  # torch.load's own error when the file did not load at all
    if cause is None:
        return str(e).split("; ")[0]
    return f"checkpoint {path.resolve()} is truncated or corrupt ({type(cause).__name__}: {first_sentence(cause)})"


def _other_sources(path: Path) -> str:
    """Advice naming the other files of the run that this tool can derive from."""
    names = [*_CHECKPOINT_NAMES, *sorted(p.name for p in path.parent.glob("checkpoint-*.pt"))]
    others = [n for n in names if n != path.name and (path.parent / n).is_file()]
    if (path.parent / _JSONL_NAME).is_file():
        others.append(_JSONL_NAME)
    if not others:
        return f"no other checkpoint or {_JSONL_NAME} is beside it to derive from"
    return f"derive from another file of the run instead: {', '.join(str(path.parent / o) for o in others)}"


def _arch_steps(ckpt: dict[str, Any]) -> int | None:
    """Optimizer steps the arch logits took, read from the arch optimizer's state (None: not recorded)."""
    opt = ckpt.get("arch_optimizer")
    if not isinstance(opt, dict) or "state" not in opt:
        return None
    return max((int(s.get("step", 0)) for s in opt["state"].values()), default=0)


def _never_moved(probs: Sequence[Sequence[float]], records: Sequence[dict[str, Any]], arch_steps: int | None) -> bool:
    """Whether the arch logits never left their initial values.

    The arch optimizer's step count says so exactly; without it (an ``arch_probs.jsonl`` alone), every epoch's
    probabilities must be the same and uniform.
    """
    if arch_steps is not None:
        return arch_steps == 0
    if len(records) < 2:  # one epoch's record: a short search moves its probabilities too little to tell
        return False
    if any(r["probs"] != records[0]["probs"] for r in records):
        return False
    return all(abs(len(row) * float(p) - 1.0) < _UNIFORM_RTOL for row in probs for p in row)


def _file_date(path: Path) -> str:
    return _dt.datetime.fromtimestamp(path.stat().st_mtime, tz=_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------------------------------------
# Derivation


def _space_with_k(space: SearchSpace, k: int | None) -> SearchSpace:
    """The space with ``k`` overridden, validated with a message that names --k."""
    if k is None:
        return space
    n = space.num_candidates
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise DerivationError(f"--k {k} is out of range for search space '{space.name}' ({n} candidates); use 1..{n}")
    if k < space.min_global:
        raise DerivationError(
            f"--k {k} cannot hold the {space.min_global} global order(s) search space '{space.name}' requires per "
            f"layer; use {space.min_global}..{n}"
        )
    return SearchSpace(name=space.name, candidates=space.candidates, k=k, min_global=space.min_global)


def derive(
    labels: Sequence[str],
    probs: Sequence[Sequence[float]],
    space: SearchSpace,
    model: str | None = None,
    provenance: dict[str, Any] | None = None,
) -> ArchSpec:
    """Keep the top-k allowed orders of every layer.

    Args:
        labels: layer labels, in model order (length ``depth``).
        probs: ``(depth, num_candidates)`` probabilities, each row in the space's candidate order.
        space: the search space (its ``k`` and ``min_global`` apply).
        model: the derived model's timm entrypoint.
        provenance: recorded as is in the arch file.

    Returns:
        The arch; each layer's orders are in candidate order.
    """
    if len(labels) != len(probs):
        raise DerivationError(f"{len(labels)} layer labels but {len(probs)} probability rows")
    layers = []
    for label, row in zip(labels, probs):
        if len(row) != space.num_candidates:
            raise DerivationError(
                f"layer '{label}' has {len(row)} probabilities but space '{space.name}' has "
                f"{space.num_candidates} candidates"
            )
        if any(not math.isfinite(float(p)) for p in row):
            raise DerivationError(f"layer '{label}': non-finite probabilities {list(row)}; the search diverged")
        layers.append(LayerChoice(str(label), tuple(select_top_k(space, row)), tuple(float(p) for p in row)))
    return ArchSpec(space=space, layers=tuple(layers), model=model, provenance=dict(provenance or {}))


# ----------------------------------------------------------------------------------------------------------------------
# Outputs


def format_table(arch: ArchSpec) -> str:
    """A fixed-width table: one row per layer, every candidate's probability, chosen ones starred."""
    cands = arch.space.candidates
    width = max(6, *(len(c) + 1 for c in cands))
    label_w = max(5, *(len(layer.label) for layer in arch.layers))
    head = f"{'layer':<{label_w}} " + " ".join(f"{c:>{width}}" for c in cands) + "  kept"
    lines = [head, "-" * len(head)]
    for layer in arch.layers:
        cells = []
        for c, p in zip(cands, layer.probs or [float("nan")] * len(cands)):
            mark = "*" if c in layer.orders else " "
            cells.append(f"{p:>{width - 1}.3f}{mark}")
        lines.append(f"{layer.label:<{label_w}} " + " ".join(cells) + "  " + ",".join(layer.orders))
    lines.append(
        f"(* kept: top {arch.space.k} per layer"
        + (f", at least {arch.space.min_global} global)" if arch.space.min_global else ")")
    )
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(arch: ArchSpec, path: str | Path, title: str = "") -> Path:
    """Layers × candidates heatmap of the derivation probabilities with the kept cells outlined.

    Cells are coloured by their distance from the uniform 1/K (a diverging scale centred there, as wide as the largest
    distance), so that a short search, whose probabilities are all near 1/K, still shows which way each layer leans;
    the labels carry as many decimals as it takes to tell the cells apart (up to 4).
    """
    import math

    import numpy as np

    plt = _pyplot()
    cands = arch.space.candidates
    probs = np.array([layer.probs for layer in arch.layers], dtype=float)
    dev = probs - 1.0 / len(cands)
    reach = max(float(np.abs(dev).max()), 1e-9)
    spread = float(probs.max() - probs.min())
    decimals = min(4, max(2, 1 - math.floor(math.log10(spread)))) if spread > 0 else 2
    fig_w = 1.6 + (0.75 + 0.1 * (decimals - 2)) * len(cands)
    fig_h = 1.4 + 0.38 * arch.depth
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=110)
    im = ax.imshow(dev, cmap="RdBu_r", vmin=-reach, vmax=reach, aspect="auto")
    for i, layer in enumerate(arch.layers):
        for j, c in enumerate(cands):
            kept = c in layer.orders
            ax.text(
                j,
                i,
                f"{probs[i, j]:.{decimals}f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if abs(dev[i, j]) > 0.6 * reach else "black",
                fontweight="bold" if kept else "normal",
            )
            if kept:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.0))
    ax.set_xticks(range(len(cands)), cands, rotation=45, ha="right")
    ax.set_yticks(range(arch.depth), [layer.label for layer in arch.layers])
    ax.set_xlabel("candidate order (outlined: kept; red above, blue below the uniform 1/K)")
    ax.set_ylabel("layer")
    ax.set_title(title or f"scan-order probabilities, top {arch.space.k} kept", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label=f"p − 1/{len(cands)}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")  # the colour bar's label whole on narrow figures
    plt.close(fig)
    return path


def plot_trajectories(records: Sequence[dict[str, Any]], path: str | Path, kept: ArchSpec | None = None) -> Path:
    """One panel per layer: each candidate's probability over the search epochs (kept orders drawn solid)."""
    plt = _pyplot()
    labels = records[-1]["labels"]
    cands = records[-1]["candidates"]
    epochs = [r["epoch"] for r in records]
    ncols = min(4, len(labels))
    nrows = math.ceil(len(labels) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.2 * ncols, 2.3 * nrows + 0.6), dpi=100, squeeze=False, sharex=True, sharey=True
    )
    cmap = plt.get_cmap("tab20" if len(cands) > 10 else "tab10")
    for li, label in enumerate(labels):
        ax = axes[li // ncols][li % ncols]
        kept_orders = set(kept.layers[li].orders) if kept is not None and li < kept.depth else set()
        for ci, cand in enumerate(cands):
            ys = [r["probs"][li][ci] for r in records]
            ax.plot(
                epochs,
                ys,
                color=cmap(ci % cmap.N),
                linewidth=1.6 if cand in kept_orders else 0.9,
                linestyle="-" if (cand in kept_orders or not kept_orders) else "--",
                label=cand,
                marker="o" if len(epochs) == 1 else None,
            )
        ax.set_title(label, fontsize=8)
        ax.grid(alpha=0.3)
    for extra in range(len(labels), nrows * ncols):
        axes[extra // ncols][extra % ncols].axis("off")
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    for ax in axes[-1]:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # records are per epoch: no 0.5 ticks
    for row in axes:
        row[0].set_ylabel("probability")
    # One legend for all panels, with plain solid lines: the per-panel styles only say "kept in this layer". Title
    # and legend take fixed heights (inches) at the top; the panels fill the rest.
    handles = [Line2D([], [], color=cmap(ci % cmap.N), linewidth=1.6) for ci in range(len(cands))]
    ncol = min(len(cands), 10)
    legend_rows = math.ceil(len(cands) / ncol)
    height = fig.get_figheight()
    # (fig.text, not suptitle: tight_layout would reserve the title's height again below the rect)
    fig.text(0.5, 0.995, "candidate probabilities during the search (solid: kept in that layer)", fontsize=9,
             ha="center", va="top")  # fmt: skip
    fig.legend(
        handles,
        list(cands),
        loc="upper center",
        bbox_to_anchor=(0.5, 1.0 - 0.2 / height),
        ncol=ncol,
        fontsize=7,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, 1.0 - (0.25 + 0.18 * legend_rows) / height))
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _cli_value(value: Any) -> str:
    """``value`` as text that reads back as ``value`` in YAML, the way retrain.train reads ``--model-kwargs k=v``."""
    return yaml.safe_dump(value, default_flow_style=True, width=float("inf")).removesuffix("\n...\n").strip()


def retrain_command(arch_path: Path, search_cfg: dict[str, Any]) -> str:
    """The ``retrain.train`` command that retrains this arch from scratch on the search's token grid and data.

    Carried over from the search's config, where they differ from retrain.train's defaults: what fixes the model and
    its token grid (``patch_size``, ``img_size``, the ``model_kwargs`` a derived child takes) and the data
    (``dataset``, ``data_dir``, ``in_chans``, ``num_samples``; the number of classes follows the data). The training
    recipe (epochs, lr, drop path, ...) is retrain.train's; SLWS is on at :data:`RETRAIN_SHUFFLE_MAX`.
    """
    from retrain.train import DEFAULTS as TRAIN_DEFAULTS
    from retrain.train import MODEL_ARGS_SET_BY_FLAGS

    model_kwargs = dict(search_cfg.get("model_kwargs") or {})
    carried = ("patch_size", "img_size", "dataset", "data_dir", "in_chans", "num_samples")
    values = {k: search_cfg.get(k) for k in carried}
    # A run from before nas.search refused it may have set its patch size through model_kwargs.
    values["patch_size"] = values["patch_size"] or model_kwargs.get("patch_size")
    values["model_kwargs"] = {
        k: v for k, v in model_kwargs.items() if k not in _SEARCH_ONLY_KWARGS and k not in MODEL_ARGS_SET_BY_FLAGS
    }
    parts = ["python", "-m", "retrain.train", "--arch", str(arch_path)]
    for key, value in values.items():
        if value is None or value == TRAIN_DEFAULTS[key]:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, dict):
            parts += [flag, *(f"{k}={_cli_value(v)}" for k, v in value.items())]
        else:
            parts += [flag, str(value)]
    parts += ["--shuffle-max", str(RETRAIN_SHUFFLE_MAX)]
    return shlex.join(parts)


# ----------------------------------------------------------------------------------------------------------------------
# main


def main(cfg: dict[str, Any]) -> dict[str, Any]:
    """Derive the arch of one search run and write the arch file and plots.

    Args:
        cfg: keys of :data:`DEFAULTS`; ``source`` is a run dir, a checkpoint or an ``arch_probs.jsonl``.

    Returns:
        ``arch`` (the :class:`ArchSpec`), ``arch_path``, ``heatmap``, ``trajectory`` (paths or None), ``epoch``,
        ``source`` (what the probabilities came from), ``command`` (the retrain command) and ``arch_moved`` (False:
        the arch logits never left their initial values, so the arch is not a search result).

    Raises:
        DerivationError: unreadable input, a bad ``k``, or an output file that exists without ``overwrite``.
    """
    cfg = {**DEFAULTS, **cfg}
    run_dir, ckpt_path, jsonl_path = _resolve_source(cfg["source"])
    records = read_arch_probs_jsonl(jsonl_path) if jsonl_path is not None else []

    search_cfg: dict[str, Any] = {}
    arch_steps = mid_epoch_step = None
    if ckpt_path is not None:
        info = _read_checkpoint(ckpt_path)
        labels, probs, space, model = info["labels"], info["probs"], info["space"], info["model"]
        epoch, search_cfg, arch_steps = info["epoch"], info["config"], info["arch_steps"]
        mid_epoch_step = info["mid_epoch_step"]
        source_path = ckpt_path
        commit = info["commit"] or git_commit()
        date = info["date"] or _file_date(ckpt_path)
    else:
        last = records[-1]
        labels, probs, epoch = last["labels"], last["probs"], last["epoch"]
        space = _space_from_candidates(last["candidates"], run_dir)
        args = run_dir / "args.yaml"
        if args.is_file():
            search_cfg = yaml.safe_load(args.read_text()) or {}
        model = _derived_name_from_config(search_cfg)
        source_path = jsonl_path
        commit = git_commit()
        date = _file_date(jsonl_path)

    space = _space_with_k(space, cfg["k"])
    try:
        rel = str(Path(source_path).resolve().relative_to(run_dir.resolve()))
    except ValueError:
        rel = str(source_path)
    provenance = {"checkpoint": rel, "epoch": epoch, "commit": commit, "date": date}
    # A checkpoint written within an epoch (a signal, --checkpoint-interval) holds logits that moved for part of it.
    when = f"epoch {epoch}"
    if mid_epoch_step is not None:
        provenance["mid_epoch_step"] = mid_epoch_step
        when = f"mid-epoch {epoch}, step {mid_epoch_step}"
    arch = derive(labels, probs, space, model=model, provenance=provenance)
    moved = not _never_moved(probs, records, arch_steps)

    if cfg["out"] and (str(cfg["out"]).endswith(("/", os.sep)) or Path(cfg["out"]).is_dir()):
        # --out names the arch file (its plots take its name as a prefix), never a folder to write into.
        folder = Path(cfg["out"])
        raise DerivationError(
            f"--out {cfg['out']} names a folder; --out names the arch file to write (its plots are named after it), "
            f"e.g. --out {folder / 'arch.yaml'}"
        )
    out = Path(cfg["out"]) if cfg["out"] else run_dir / "arch.yaml"
    stem = out.with_suffix("")
    heatmap_path = Path(f"{stem}_heatmap.png") if cfg["plots"] else None
    trajectory_path = Path(f"{stem}_trajectory.png") if cfg["plots"] and records else None
    targets = [p for p in (out, heatmap_path, trajectory_path) if p is not None]
    # Every file is checked before any is written, so that a refusal loses nothing the user had.
    folders = [p for p in targets if p.is_dir()]
    if folders:
        names = ", ".join(str(p.resolve()) for p in folders)
        raise DerivationError(f"{names} {'is a folder' if len(folders) == 1 else 'are folders'}; choose another --out")
    # The search's own files are never an output, not even with --overwrite: its checkpoints (the input and the resume
    # point), args.yaml, summary.csv, arch_probs.jsonl.
    own = {p.resolve() for p in (ckpt_path, jsonl_path) if p is not None}
    own |= {p.resolve() for p in run_dir.glob("*.pt")} | {(run_dir / f).resolve() for f in RUN_FILES}
    theirs = [p for p in targets if p.resolve() in own]
    if theirs:
        names = ", ".join(str(p.resolve()) for p in theirs)
        what = "is one of the search run's files" if len(theirs) == 1 else "are the search run's files"
        raise DerivationError(f"{names} {what}; choose another --out (e.g. --out {run_dir / 'arch.yaml'})")
    existing = [p for p in targets if p.exists()]
    if existing and not cfg["overwrite"]:
        names = ", ".join(str(p.resolve()) for p in existing)
        raise DerivationError(
            f"{names} {'exists' if len(existing) == 1 else 'exist'}; choose another --out or pass --overwrite"
        )
    writers = {out: lambda tmp: save_arch(arch, tmp, overwrite=True)}
    if heatmap_path is not None:
        title = f"{run_dir.name}: {when}, top {space.k} kept"
        writers[heatmap_path] = lambda tmp: plot_heatmap(arch, tmp, title=title)
    if trajectory_path is not None:
        writers[trajectory_path] = lambda tmp: plot_trajectories(records, tmp, kept=arch)
    _write_all(writers)
    heatmap, trajectory = heatmap_path, trajectory_path
    command = retrain_command(out, search_cfg)
    if not cfg["quiet"]:
        print(f"derived from {source_path} ({when}), search space '{space.name}', k={space.k}")
        print(format_table(arch))
        print(f"arch file: {out}")
        if heatmap:
            print(f"heatmap:   {heatmap}")
        if trajectory:
            print(f"trajectory: {trajectory}")
        print("next, retrain it from scratch:")
        print(f"  {command}")
    if not moved:
        how = "the checkpoint records no arch step" if arch_steps is not None else "every epoch's probabilities are 1/K"
        print(
            f"warning: the arch logits never moved from their initial values ({how}), so {out} is initialization "
            f"noise, not a search result; search for more epochs than --arch-warmup-epochs",
            file=sys.stderr,
        )
    return {
        "arch": arch,
        "arch_path": out,
        "heatmap": heatmap,
        "trajectory": trajectory,
        "epoch": epoch,
        "source": source_path,
        "command": command,
        "arch_moved": moved,
    }


def _write_all(writers: dict[Path, Any]) -> None:
    """Write every file through a temporary one beside it, and put them in place only when all are written.

    A failure part way leaves neither temporary files nor a partial set of outputs, and the user's files (with
    --overwrite) are replaced only by complete ones. The output folder is created if missing, and removed again if the
    writing fails.
    """
    folder = next(iter(writers)).parent
    created = _make_folder(folder)
    temps: dict[Path, Path] = {}
    try:
        for final, write in writers.items():
            # The real suffix last: matplotlib picks the image format from it. The name is cut so that a final name
            # near the file system's limit does not make a temporary one past it.
            fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name[:64]}.", suffix=f".tmp{final.suffix}")
            os.fchmod(fd, FILE_MODE)  # mkstemp's 0600, as open() would make it under the umask
            os.close(fd)
            temps[final] = Path(tmp)
            write(temps[final])
        for final, tmp in temps.items():
            os.replace(tmp, final)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass
        raise


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents, as output paths usually are; return those created, outermost first."""
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise DerivationError(f"{p.resolve()} is a file, not a folder; choose another --out")
    created: list[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except OSError as e:
            for c in reversed(created):
                c.rmdir()
            raise DerivationError(
                f"cannot create the folder {d.resolve()} ({e.strerror}); choose another --out"
            ) from None
        created.append(d)
    return created


def _derived_name_from_config(search_cfg: dict[str, Any]) -> str | None:
    """The derived entrypoint of the run's supernet, asked of the model class (no name mangling here)."""
    name = search_cfg.get("model")
    if not name:
        return None
    try:
        import timm

        import supernet  # noqa: F401

        model = timm.create_model(name, pretrained=False)
    except Exception:  # noqa: BLE001 - the name is optional provenance; derivation works without it
        return None
    return getattr(model, "derived_model_name", None)


def _parse_args(argv: Sequence[str] | None) -> dict[str, Any]:
    parser = OneLineArgumentParser(
        prog="python -m nas.vis_search_prob",
        description="Derive the searched arch (top-k orders per layer) into an arch file, with a heatmap and "
        "probability trajectories.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "source", metavar="RUN_DIR_OR_CHECKPOINT", help="search run dir, its last.pt, or arch_probs.jsonl"
    )
    options = [
        parser.add_argument("--k", type=int, default=None, help="orders kept per layer (default: the space's k)"),
        parser.add_argument(
            "--out", default=None, help="arch file to write; the PNGs take its name (default: RUN_DIR/arch.yaml)"
        ),
        parser.add_argument("--overwrite", action="store_true", help="replace existing files (--out and its PNGs)"),
        parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNGs"),
        parser.add_argument("--debug", action="store_true", help="show tracebacks"),
    ]
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Worded as retrain.config words it for the other CLIs: the first unknown flag, then the nearest valid one.
        first = next((u for u in unknown if u.startswith("-")), unknown[0])
        keys = [f[2:].replace("-", "_") for a in options for f in a.option_strings]
        hint = nearest_flag(first, keys) or f"; see {parser.prog} --help"
        parser.exit(2, f"error: unknown argument '{first}'{hint}\n")
    return vars(args)


def cli(argv: Sequence[str] | None = None) -> int:
    """The thin shell: parse, run, one-line errors (exit 2), tracebacks only with --debug."""
    args = _parse_args(argv)
    debug = args.pop("debug")
    if not debug:  # warnings as one line each, like the errors
        warnings.showwarning = one_line_warning
    try:
        main(args)
    except (ValueError, OSError) as e:  # OSError: folders and files (missing, read-only, full)
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
