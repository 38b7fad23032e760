"""Crash-safe checkpoints: atomic writes, a completeness marker, safe loading and ``--resume auto``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that it loads with
``torch.load(weights_only=True)`` (no pickled Python objects, hence no code execution from a foreign file). Every
checkpoint carries ``format``, ``kind`` (``"retrain"`` or ``"search"``), ``model`` (the model name) and, written last,
``complete: True``. The weights are under timm's keys, ``state_dict`` (and ``state_dict_ema`` with EMA), so
``timm.create_model(name, checkpoint_path=...)`` and ``pretrained_cfg_overlay=dict(file=...)`` load them (timm prefers
the EMA weights, as for its own checkpoints). Checkpoints of earlier versions held them as ``model_state`` / ``ema``:
:func:`load_checkpoint` reads those under the new keys.
"""

from __future__ import annotations

import heapq
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from retrain.config import one_line, plain_value

__all__ = [
    "RUN_FILES",
    "arch_difference",
    "refuse_existing_run",
    "RESUME_EXEMPT_ARGS",
    "check_resume_recipe",
    "check_resume_spec",
    "check_resume_steps",
    "first_sentence",
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "CheckpointKeeper",
    "load_checkpoint",
    "resolve_resume",
    "resolved_model_args",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "scan-nas-checkpoint-v1"

# Earlier versions' names for the weights → timm's (which its checkpoint loaders look for)
_RENAMED_KEYS = {"model_state": "state_dict", "ema": "state_dict_ema"}


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, foreign, or from another model; the message is one line.
    ``unreadable`` is True when the file itself is damaged (it did not load, or lacks its completeness marker)."""

    def __init__(self, message: str, unreadable: bool = False) -> None:
        super().__init__(message)
        self.unreadable = unreadable


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: ``path.tmp``, flush + fsync, then ``os.replace``.

    Args:
        state: a plain dict; must hold ``kind`` and ``model``. ``format`` and ``complete`` are added.

    Returns:
        The checkpoint path.
    """
    for key in ("kind", "model"):
        if key not in state:
            raise ValueError(f"checkpoint state needs a '{key}' entry")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, **state}
    payload.pop("complete", None)
    payload["complete"] = True  # written last: a reader that sees it saw the whole dict
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def first_sentence(e: BaseException) -> str:
    """The first sentence of an exception's message on one line: torch's load errors go on for paragraphs."""
    first = (str(e).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")
    return one_line(first, 200)


def load_checkpoint(
    path: str | Path,
    expect_kind: str | None = None,
    expect_model: str | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, refusing anything else with one line.

    Args:
        path: the ``.pt`` file.
        expect_kind: ``"retrain"`` or ``"search"``, when the caller needs one.
        expect_model: the model name the caller is about to load it into.
        map_location: where tensors go.

    Raises:
        CheckpointError: missing, truncated/corrupt, not ours, incomplete, other kind or other model.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path.resolve()}; check the path or use --resume auto")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled objects refused by weights_only
        raise CheckpointError(
            f"checkpoint {path.resolve()} is truncated, corrupt or not a plain-tensor checkpoint "
            f"({type(e).__name__}: {first_sentence(e)}); use another checkpoint of the run (a training run: "
            f"--resume auto picks the newest complete one)",
            unreadable=True,
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path.resolve()} is not a scan-nas checkpoint (no '{CHECKPOINT_FORMAT}' marker); timm or other weights "
            f"cannot be resumed"
        )
    if state.get("complete") is not True:
        raise CheckpointError(
            f"checkpoint {path.resolve()} is incomplete (no completeness marker); use another one", unreadable=True
        )
    for old, new in _RENAMED_KEYS.items():
        if old in state and new not in state:
            state[new] = state.pop(old)
    if expect_kind is not None and state.get("kind") != expect_kind:
        raise CheckpointError(
            f"checkpoint {path.resolve()} is a '{state.get('kind')}' checkpoint, expected '{expect_kind}' "
            f"({'nas.search' if expect_kind == 'search' else 'retrain.train'} writes those)"
        )
    if expect_model is not None and state.get("model") != expect_model:
        raise CheckpointError(
            f"checkpoint {path.resolve()} holds model '{state.get('model')}', not '{expect_model}'; pass the matching "
            f"--model or start a new --experiment"
        )
    return state


RUN_FILES = ("args.yaml", "summary.csv", "arch_probs.jsonl")  # what the trainers write into a run directory


def refuse_existing_run(run_dir: str | Path, resume: str, resume_path: Path | None) -> None:
    """Refuse, in one line, to start a run in a directory that holds another run: checkpoints (continue them with
    ``--resume auto``) or, without checkpoints, the files a run writes (``--resume auto`` there starts it again in
    place). Resuming one of the directory's own checkpoints continues its run; resuming another run's checkpoint
    (``--resume PATH``) into a directory that holds a run would write over it and is refused too.

    Raises:
        ValueError: naming the directory and the ways out.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    if resume_path is not None and Path(resume_path).resolve().parent == run_dir.resolve():
        return  # continuing this directory's own run
    checkpoints = sorted(p.name for p in run_dir.glob("*.pt"))
    files = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume_path is not None:
        if checkpoints or files:
            raise ValueError(
                f"{run_dir.resolve()} holds another run ({', '.join(checkpoints[:1] + files)}); resuming {resume_path} "
                f"there would write over it: choose a new --experiment, or resume one of that folder's own checkpoints"
            )
    elif checkpoints:
        raise ValueError(
            f"{run_dir.resolve()} already holds checkpoints; pass --resume auto to continue it or choose a new "
            f"--experiment"
        )
    elif files and not resume:
        raise ValueError(
            f"{run_dir.resolve()} holds another run's {', '.join(files)} but no checkpoint; pass --resume auto to "
            f"start that run again in place (its files are rewritten) or choose a new --experiment"
        )


def _arch_orders(arch: dict[str, Any] | None) -> list | None:
    return None if arch is None else [plain_value(layer.get("orders")) for layer in arch.get("layers", [])]


# Constructor arguments that the resolved arguments leave out: the model name is the checkpoint's own ``model``, and an
# arch is compared through its orders (:func:`check_resume_spec`).
_UNRESOLVED_ARGS = ("model_name", "arch")


def _is_plain(value: Any) -> bool:
    """Whether ``value`` (after :func:`plain_value`) is what a checkpoint stores as it is: numbers, text, None, and
    lists and dicts of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_is_plain(v) for v in value.values())
    return False


def resolved_model_args(model: Any) -> dict[str, Any] | None:
    """The constructor arguments of a built model as it resolved them, defaults included (our models record them as
    ``init_args``), as plain values for a checkpoint's ``model_spec["resolved_kwargs"]``; ``None`` for a model that
    does not record them (timm's own).

    A search ``space`` (a preset name, a file, a dict) is kept as the space the model resolved (its ``to_dict()``);
    the model name and an arch are left out (the checkpoint's ``model`` and the arch's orders say them), and so is
    any other value that is not plain: a resume compares those as they were passed.
    """
    init_args = getattr(model, "init_args", None)
    if not isinstance(init_args, Mapping):
        return None
    out = {}
    for key, value in init_args.items():
        if key in _UNRESOLVED_ARGS:
            continue
        if key == "space" and value is not None and getattr(model, "search_space", None) is not None:
            value = model.search_space.to_dict()
        value = plain_value(value)
        if _is_plain(value):
            out[str(key)] = value
    if out.get("dt_rank") == "auto" and hasattr(model, "named_mixers"):
        # "auto" as the integer every layer resolved it to (the plain family's one rank): the same model either way
        ranks = {m.dt_rank for _, m in model.named_mixers()}
        if len(ranks) == 1:
            out["dt_rank"] = ranks.pop()
    return out


# Constructor arguments that change neither the weights nor the saved state, only how the same math runs: which
# implementation of the scan (``scan_backend``), and whether its backward keeps the chunk-start states or recomputes
# them (``scan_recompute``). A resume may change them.
RESUME_EXEMPT_ARGS = ("scan_backend", "scan_recompute")


def _orders_text(orders: Any) -> str:
    """A layer's orders as ``[h, v]``."""
    if isinstance(orders, (list, tuple)):
        return "[" + ", ".join(_orders_text(o) for o in orders) + "]"
    return str(orders)


def arch_difference(saved: dict[str, Any] | None, asked: dict[str, Any] | None) -> str | None:
    """How two archs differ, as a short phrase (``layer blocks.0 orders [h, v] vs [h, w2]``, saved first), or None
    when their orders are the same."""
    then, now = _arch_orders(saved), _arch_orders(asked)
    if then == now:
        return None
    if then is None or now is None:
        none, some = "none (the model's own orders)", "an arch file's orders"
        return f"{none if then is None else some} vs {none if now is None else some}"
    if len(then) != len(now):
        return f"of {len(then)} layers vs {len(now)} layers"
    i = next(i for i, (a, b) in enumerate(zip(then, now)) if a != b)
    label = ((saved or {}).get("layers") or [{}] * len(then))[i].get("label") or f"#{i}"
    more = sum(a != b for a, b in zip(then, now)) - 1
    rest = f" (and {more} more layer{'s' if more > 1 else ''})" if more else ""
    return f"layer {label} orders {_orders_text(then[i])} vs {_orders_text(now[i])}{rest}"


def check_resume_spec(state: dict[str, Any], spec: dict[str, Any], path: str | Path) -> None:
    """Refuse, in one line, to resume a checkpoint whose model was built with other constructor arguments or another
    arch than this run's (``spec`` as the trainers build it: ``name``, ``kwargs``, optionally ``arch`` and
    ``resolved_kwargs``).

    When the checkpoint and this run both hold ``resolved_kwargs`` (see :func:`resolved_model_args`), the arguments
    they both resolved compare as resolved, so that an argument passed at its default value, or no longer passed at
    it, is no change; any other argument (one left out of them, or one that only one side's model code knows)
    compares as passed (``kwargs``). A checkpoint without them (older trainers, timm's own models) compares the
    passed ``kwargs`` alone. :data:`RESUME_EXEMPT_ARGS` (the scan's implementation and its recomputation) are not
    compared. An arch is compared by its layers' orders; the first layer that differs is named.

    Raises:
        CheckpointError: naming each argument that differs, with the saved and the asked value.
    """
    saved = state.get("model_spec") or {}
    old, new = plain_value(saved.get("kwargs") or {}), plain_value(spec.get("kwargs") or {})
    old_resolved, new_resolved = saved.get("resolved_kwargs"), spec.get("resolved_kwargs")
    if isinstance(old_resolved, Mapping) and isinstance(new_resolved, Mapping):
        both = set(old_resolved) & set(new_resolved)
        old.update({k: plain_value(old_resolved[k]) for k in both})
        new.update({k: plain_value(new_resolved[k]) for k in both})
    for key in RESUME_EXEMPT_ARGS:
        old.pop(key, None)
        new.pop(key, None)
    if old.get("dt_rank") == "auto" and isinstance(new.get("dt_rank"), int):
        # a checkpoint that kept "auto" unresolved: its weights say the rank every layer took
        weights = state.get("state_dict") or {}
        ranks = {tuple(t.shape)[-1] for k, t in weights.items() if k.endswith("mixer.dt_proj_weight")}
        if ranks == {new["dt_rank"]}:
            old["dt_rank"] = new["dt_rank"]
    unset = "(unset)"
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k, unset) != new.get(k, unset)]
    arch = arch_difference(saved.get("arch"), spec.get("arch"))
    if changed or arch:
        what = []
        if changed:
            then = ", ".join(f"{k}={old.get(k, unset)}" for k in changed)
            now = ", ".join(f"{k}={new.get(k, unset)}" for k in changed)
            what.append(f"was built with {then}, but this run asks for {now}")
        if arch:
            what.append(f"{'and' if changed else 'was built with'} another arch (saved vs asked: arch {arch})")
        raise CheckpointError(
            f"checkpoint {Path(path).resolve()} {' '.join(what)}; resume with the run's own settings (its args.yaml) "
            f"or start a new --experiment"
        )


def check_resume_recipe(state: dict[str, Any], cfg: dict[str, Any], keys: Sequence[str], path: str | Path) -> None:
    """Refuse, in one line, to resume a run with other values of the settings its saved state depends on (``keys``
    of the run's config: the LR schedule's length and shape, the batch size a mid-epoch position counts in, the
    validation split), naming each with the saved and the asked value. Keys the checkpoint did not record pass.

    Raises:
        CheckpointError: naming each setting that differs.
    """
    saved = state.get("config") or {}
    changed = [k for k in keys if k in saved and k in cfg and plain_value(saved[k]) != plain_value(cfg[k])]
    if changed:
        flag = [f"--{k.replace('_', '-')}" for k in changed]
        then = ", ".join(f"{f} {saved[k]!r}" for f, k in zip(flag, changed))
        now = ", ".join(f"{f} {cfg[k]!r}" for f, k in zip(flag, changed))
        raise CheckpointError(
            f"checkpoint {Path(path).resolve()} was trained with {then}, but this run asks for {now}; its LR schedule, "
            f"optimizer state, data order and validation split follow the former: resume with the run's own settings "
            f"(its args.yaml) or start a new --experiment"
        )


def check_resume_steps(
    state: dict[str, Any],
    steps_per_epoch: int,
    train_size: int,
    path: str | Path,
    images: str = "training images",
) -> None:
    """Refuse, in one line, to resume a checkpoint saved at another number of steps per epoch than this run takes
    (another training-set size, ``--num-samples`` say, or another number of processes): its position in the epoch and
    its per-step LR schedule count in its own steps. Checkpoints that did not record it pass; so does the same data
    from another folder. ``images`` names what ``train_size`` (and the checkpoint's ``train_size``) counts.

    Raises:
        CheckpointError: naming the saved and the asked steps per epoch (and training-set sizes).
    """
    saved = state.get("steps_per_epoch")
    if saved is None or int(saved) == int(steps_per_epoch):
        return
    saved_size = state.get("train_size")
    then = f"{int(saved)} steps per epoch" + (f" ({saved_size} {images})" if saved_size is not None else "")
    raise CheckpointError(
        f"checkpoint {Path(path).resolve()} was saved at {then}, but this run takes {steps_per_epoch} "
        f"({train_size} {images}); its position in the epoch and its per-step LR schedule count in the "
        f"former: resume with the run's own data (--num-samples, --dataset and the data in --data-dir), --batch-size "
        f"and number of processes, or start a new --experiment"
    )


def _checkpoints_in(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.glob("*.pt") if p.is_file()]


def resolve_resume(resume: str | Path | None, run_dir: str | Path, verbose: bool = True) -> Path | None:
    """Turn a ``--resume`` value into a checkpoint path.

    Args:
        resume: ``None``/``""`` (no resume), ``"auto"`` (the newest complete checkpoint in ``run_dir``; ``None`` if
            the directory has none), or a path.
        run_dir: the run directory searched by ``"auto"``.
        verbose: say which checkpoint is used.

    Raises:
        CheckpointError: an explicit path that does not load, or ``auto`` finding only broken checkpoints (never a
            silent restart from scratch).
    """
    if not resume:
        return None
    if str(resume) != "auto":
        path = Path(resume)
        load_checkpoint(path)  # fail early, with the one-line reason
        return path
    run_dir = Path(run_dir)
    candidates = _checkpoints_in(run_dir) if run_dir.is_dir() else []
    if not candidates:
        if verbose:
            print(f"resume auto: no checkpoint in {run_dir}, starting from scratch", file=sys.stderr)
        return None
    best: tuple[tuple[int, int, bool, float], Path] | None = None
    errors = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        # Newest = furthest in training; on ties (copies of one state) prefer last.pt, then the most recent write.
        key = (int(state.get("step", -1)), int(state.get("epoch", -1)), path.name == "last.pt", path.stat().st_mtime)
        if best is None or key > best[0]:
            best = (key, path)
    if best is None:
        raise CheckpointError(f"resume auto: no complete checkpoint in {run_dir.resolve()} ({errors[0]})")
    if verbose:
        print(f"resume auto: using {best[1]} (epoch {best[0][1]}, step {best[0][0]})", file=sys.stderr)
    return best[1]


class CheckpointKeeper:
    """``last.pt`` every time, ``best.pt`` when the metric improves, and the top-k ``checkpoint-<epoch>.pt`` files.

    Like timm's CheckpointSaver, but for plain-dict states; its own state goes into ``last.pt`` so that a resumed
    run keeps the same ranking.

    Args:
        run_dir: where checkpoints go.
        max_history: how many per-epoch checkpoints to keep (0 keeps none).
        decreasing: ``True`` when a lower metric is better (e.g. a loss).
    """

    def __init__(self, run_dir: str | Path, max_history: int = 3, decreasing: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.max_history = max_history
        self.decreasing = decreasing
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.history: list[tuple[float, int]] = []  # (metric, epoch) of the kept per-epoch files

    def _better(self, a: float, b: float | None) -> bool:
        return b is None or (a < b if self.decreasing else a > b)

    def _score(self, metric: float) -> float:
        return -metric if self.decreasing else metric

    def save(self, state: dict[str, Any], epoch: int, metric: float) -> dict[str, Path]:
        """Write last (and best / top-k when earned); return the paths written by role."""
        written = {}
        is_best = self._better(metric, self.best_metric)
        if is_best:
            self.best_metric, self.best_epoch = float(metric), epoch
        new_history = self.history
        hist_path = None
        if self.max_history > 0:
            entries = [*self.history, (float(metric), epoch)]
            kept = heapq.nlargest(self.max_history, entries, key=lambda t: (self._score(t[0]), t[1]))
            if (float(metric), epoch) in kept:
                hist_path = self.run_dir / f"checkpoint-{epoch}.pt"
            new_history = kept
        state = {**state, "keeper": self.state_dict(history=new_history)}
        # last.pt is written last: it is the commit point, so a kill in between leaves a consistent last.pt.
        if hist_path is not None:
            written["history"] = save_checkpoint(state, hist_path)
        if is_best:
            written["best"] = save_checkpoint(state, self.run_dir / "best.pt")
        written["last"] = save_checkpoint(state, self.run_dir / "last.pt")
        for _, old_epoch in self.history:
            if all(e != old_epoch for _, e in new_history):
                (self.run_dir / f"checkpoint-{old_epoch}.pt").unlink(missing_ok=True)
        self.history = new_history
        return written

    def state_dict(self, history: list[tuple[float, int]] | None = None) -> dict[str, Any]:
        history = self.history if history is None else history
        return {
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "history": [[float(m), int(e)] for m, e in history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_metric = state.get("best_metric")
        self.best_epoch = state.get("best_epoch")
        self.history = [(float(m), int(e)) for m, e in state.get("history", [])]
