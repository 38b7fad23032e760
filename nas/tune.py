"""Hyper-parameter sweeps of the search or the retraining with Ray Tune, Optuna (seeded TPE) and ASHA.

``python -m nas.tune --target search|retrain -c BASE.yaml --space SPACE.yaml --num-samples N [--max-concurrent C]
[--gpus-per-trial G] [--cpus-per-trial C] [--address ADDRESS] [--resume SWEEP_DIR] [--output DIR] [--name NAME]``

Each trial is one ordinary run of the target (``nas.search.main`` or ``retrain.train.main``) with the base config plus
the sampled values, in the trial's own directory. It reports the target's per-epoch metrics to Tune together with its
latest checkpoint, so ASHA can stop it at a rung and a failed trial restarts from where it was
(``FailureConfig(max_failures)``). The sweep runs on a local Ray started here, or joins a cluster with ``--address``;
``--resume`` continues an interrupted sweep (Optuna's state included) with ``Tuner.restore``.

The sweep space is a YAML file::

    params:                      # keys of the target's config (snake_case or kebab-case)
      lr: {distribution: loguniform, low: 1.0e-4, high: 1.0e-2}
      drop_path: {distribution: uniform, low: 0.0, high: 0.2}
      depth: {distribution: int, low: 2, high: 6}          # both ends included
      shuffle_max: {distribution: choice, values: [0.0, 0.1, 0.5]}
    seed: 0                      # Optuna TPE sampler seed (default 0)
    asha: {grace_period: 1, reduction_factor: 2}          # max_t defaults to the largest number of epochs
    max_failures: 1              # restarts of a failed trial from its last checkpoint

The sweep directory ``OUTPUT/NAME`` ends up holding Ray's experiment state and trials, plus ``sweep.yaml`` (what was
asked), ``best_config.yaml`` (accepted by the target's ``-c`` as is), ``trials.csv``, ``trials.md`` and
``trials.png`` (the metric of every trial over epochs).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from retrain.config import (
    ConfigError,
    OneLineArgumentParser,
    check_model_kwargs,
    nearest_key,
    one_line,
    one_line_warning,
    resolve_config,
    save_config,
)

__all__ = ["DEFAULTS", "TARGETS", "SweepSpace", "held_out_base", "load_sweep_space", "main", "target_for"]


@dataclasses.dataclass(frozen=True)
class Target:
    """What a sweep needs to know about a trainable script."""

    module: str  # the module whose ``DEFAULTS`` and ``main(cfg, on_epoch=...)`` a trial uses
    metric: str  # the per-epoch metric to optimise, as the target passes it to ``on_epoch``
    mode: str  # "max" or "min"
    what: str  # a few words for messages


TARGETS: dict[str, Target] = {
    "search": Target("nas.search", "arch_top1", "max", "top-1 on the held-out arch split"),
    "retrain": Target("retrain.train", "top1", "max", "validation top-1"),  # ema_top1 with model_ema: target_for()
}
# A retrain sweep validates on this held-out fraction of the train split when its base config says val_frac 0:
# selecting trials on the test split would leak it into the hyper-parameters.
RETRAIN_VAL_FRAC = 0.1


def target_for(target: str, base_cfg: Mapping[str, Any]) -> Target:
    """The :data:`TARGETS` entry, with the metric the target's checkpoints are chosen by (EMA's when it is on)."""
    spec = TARGETS[target]
    if target == "retrain" and base_cfg.get("model_ema"):
        return dataclasses.replace(spec, metric=f"ema_{spec.metric}", what=f"EMA {spec.what}")
    return spec


def held_out_base(target: str, base_cfg: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A retrain base config that validates on a held-out part of the train split, and a note when it was changed."""
    base = dict(base_cfg)
    if target != "retrain" or float(base.get("val_frac", 0.0) or 0.0) > 0:
        return base, None
    base["val_frac"] = RETRAIN_VAL_FRAC
    return base, (
        f"note: the base config validates on the test split (val_frac 0); trials hold out val_frac "
        f"{RETRAIN_VAL_FRAC} of the train split instead (set val_frac in the base config to choose)"
    )


DEFAULTS: dict[str, Any] = {
    # None: not given (a new sweep takes NEW_SWEEP_DEFAULTS; --resume keeps the saved value)
    "target": None,
    "config": "",  # base config of the target (YAML accepted by its -c)
    "space": "",  # sweep space YAML
    "num_samples": None,
    "max_concurrent": None,  # 0: as many as the resources allow
    "gpus_per_trial": None,
    "cpus_per_trial": None,
    "address": None,  # join this Ray cluster instead of starting a local one
    "resume": None,  # a sweep directory to continue
    "output": "runs/tune",
    "name": None,  # default: <target>-<UTC time>
    "quiet": False,
}

# What a new sweep takes for the keys not given.
NEW_SWEEP_DEFAULTS: dict[str, Any] = {
    "target": "retrain",
    "num_samples": 8,
    "max_concurrent": 0,
    "gpus_per_trial": 0.0,
    "cpus_per_trial": 1.0,
}

# Keys a trial sets itself: sampling them would fight the sweep's own bookkeeping.
_MANAGED_KEYS = ("output", "experiment", "resume")
_DISTRIBUTIONS = ("loguniform", "uniform", "int", "randint", "choice")
_SPACE_KEYS = ("params", "seed", "asha", "max_failures")
_ASHA_KEYS = ("grace_period", "reduction_factor", "max_t")
_RUN_SUBDIR = "run"  # the target's experiment directory inside each trial directory


# ----------------------------------------------------------------------------------------------------------------------
# The sweep space


@dataclasses.dataclass(frozen=True)
class Param:
    """One swept key: ``distribution`` with ``low``/``high`` (both included for ``int``) or ``values``."""

    name: str
    distribution: str
    low: float | int | None = None
    high: float | int | None = None
    values: tuple[Any, ...] = ()

    def domain(self) -> Any:
        """The Ray Tune search domain (OptunaSearch turns it into an Optuna distribution)."""
        from ray import tune

        if self.distribution == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.distribution == "uniform":
            return tune.uniform(self.low, self.high)
        if self.distribution == "int":
            return tune.randint(self.low, self.high + 1)  # Tune's upper bound is exclusive
        return tune.choice(list(self.values))

    def extremes(self) -> list[Any]:
        return list(self.values) if self.distribution == "choice" else [self.low, self.high]


@dataclasses.dataclass(frozen=True)
class SweepSpace:
    """A validated sweep space file."""

    params: tuple[Param, ...]
    seed: int = 0
    grace_period: int = 1
    reduction_factor: float = 2
    max_t: int | None = None
    max_failures: int = 1

    def param_space(self) -> dict[str, Any]:
        return {p.name: p.domain() for p in self.params}


def _number(value: Any, where: str, integer: bool = False) -> float | int:
    # PyYAML reads "1e-4" (no dot) as a string: accept it rather than make users learn YAML 1.1.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if integer:
        if float(value) != int(value):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def _parse_param(name: str, spec: Any, defaults: Mapping[str, Any], source: str) -> Param:
    key = name if name in defaults else name.replace("-", "_")
    where = f"{source}: params.{name}"
    if key not in defaults:
        hint = nearest_key(key, list(defaults), list_valid=True)
        raise ConfigError(f"{where}: '{name}' is not a config key of the target{hint}")
    if key in _MANAGED_KEYS:
        raise ConfigError(f"{where}: '{key}' is set by the sweep for each trial; it cannot be swept")
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{where} must be a mapping such as {{distribution: loguniform, low: 1.0e-4, high: 1.0e-2}}, got {spec!r}"
        )
    if "distribution" not in spec:
        raise ConfigError(f"{where}: missing 'distribution' (one of {', '.join(_DISTRIBUTIONS)})")
    dist = str(spec["distribution"])
    if dist not in _DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution '{dist}'{nearest_key(dist, _DISTRIBUTIONS, list_valid=True)}")
    dist = "int" if dist == "randint" else dist
    allowed = ("distribution", "values") if dist == "choice" else ("distribution", "low", "high")
    for k in spec:
        if k not in allowed:
            hint = nearest_key(str(k), allowed, list_valid=True)
            raise ConfigError(f"{where}: unknown key '{k}' for distribution '{dist}'{hint}")
    default = defaults[key]
    if dist == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: 'values' must be a non-empty list")
        param = Param(key, dist, values=tuple(values))
    else:
        for k in ("low", "high"):
            if k not in spec:
                raise ConfigError(f"{where}: missing '{k}'")
        integer = dist == "int"
        low = _number(spec["low"], f"{where}.low", integer)
        high = _number(spec["high"], f"{where}.high", integer)
        if low >= high:
            raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
        if dist == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
        if isinstance(default, bool) or isinstance(default, (str, list, tuple)):
            raise ConfigError(f"{where}: '{key}' is not numeric (default {default!r}); use distribution: choice")
        if isinstance(default, int) and dist != "int":
            raise ConfigError(f"{where}: '{key}' is an integer; use distribution: int (or choice)")
        param = Param(key, dist, low=low, high=high)
    # Every value the sampler can produce must pass the target's own type checks.
    for value in param.extremes():
        try:
            resolve_config(defaults, overrides={key: value})
        except ConfigError as e:
            raise ConfigError(f"{where}: {one_line(e).removeprefix('overrides: ')}") from None
    return param


def load_sweep_space(path: str | Path, defaults: Mapping[str, Any]) -> SweepSpace:
    """Read and validate a sweep space file against the target's config keys.

    Args:
        path: the YAML file (schema in the module docstring).
        defaults: the target's ``DEFAULTS`` (valid keys and their types).

    Raises:
        ConfigError: one line naming the problem (unknown key or distribution with the nearest valid one,
            ``low >= high``, a type the target would refuse, ...).
    """
    path = Path(path)
    source = f"sweep space {path}"
    if not path.is_file():
        raise ConfigError(f"sweep space file not found: {path.resolve()}; check the path given to --space")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(one_line(f"{source}: not valid YAML ({e})")) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not a text file; pass a sweep space YAML to --space") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with 'params', got {type(data).__name__}")
    for k in data:
        if k not in _SPACE_KEYS:
            raise ConfigError(f"{source}: unknown key '{k}'{nearest_key(str(k), _SPACE_KEYS, list_valid=True)}")
    params = data.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{source}: 'params' must map at least one config key to a distribution")
    parsed = tuple(_parse_param(str(name), spec, defaults, source) for name, spec in params.items())
    names = [p.name for p in parsed]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: a key is given twice (snake_case and kebab-case?): {names}")
    asha = data.get("asha") or {}
    if not isinstance(asha, dict):
        raise ConfigError(f"{source}: 'asha' must be a mapping with {', '.join(_ASHA_KEYS)}")
    for k in asha:
        if k not in _ASHA_KEYS:
            raise ConfigError(f"{source}: unknown key 'asha.{k}'{nearest_key(str(k), _ASHA_KEYS, list_valid=True)}")
    grace = _number(asha.get("grace_period", 1), f"{source}: asha.grace_period", integer=True)
    rf = _number(asha.get("reduction_factor", 2), f"{source}: asha.reduction_factor")
    max_t = asha.get("max_t")
    max_t = None if max_t is None else _number(max_t, f"{source}: asha.max_t", integer=True)
    if grace < 1 or rf <= 1 or (max_t is not None and max_t < grace):
        raise ConfigError(f"{source}: asha needs grace_period >= 1, reduction_factor > 1 and max_t >= grace_period")
    seed = _number(data.get("seed", 0), f"{source}: seed", integer=True)
    max_failures = _number(data.get("max_failures", 1), f"{source}: max_failures", integer=True)
    return SweepSpace(
        parsed, seed=seed, grace_period=grace, reduction_factor=rf, max_t=max_t, max_failures=max_failures
    )


# ----------------------------------------------------------------------------------------------------------------------
# One trial (runs in a Ray worker)


def _numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[str(k)] = float(v)
        elif hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
            out[str(k)] = float(v.item())
    return out


def make_trainable(target: str, base_cfg: Mapping[str, Any], threads: int, workdir: str) -> Callable[[dict], None]:
    """The function Tune runs for every trial: the target's ``main`` with the sampled values.

    Args:
        target: a key of :data:`TARGETS`.
        base_cfg: the resolved base config of the target.
        threads: torch intra-op threads (the trial's CPUs), so concurrent trials do not oversubscribe the cores.
        workdir: the directory relative paths of the base config refer to (where the sweep was launched).
    """
    spec = TARGETS[target]
    base = dict(base_cfg)

    def trial(config: dict[str, Any]) -> None:
        import torch
        from ray import tune

        torch.set_num_threads(max(1, threads))
        if os.path.isdir(workdir):  # relative data/arch paths in the base config mean the launch directory
            os.chdir(workdir)
        module = importlib.import_module(spec.module)
        trial_dir = _trial_run_root(tune.get_context())
        overrides = {**base, **config, "output": str(trial_dir), "experiment": _RUN_SUBDIR, "resume": ""}
        cfg = resolve_config(module.DEFAULTS, overrides=overrides)

        def on_epoch(epoch: int, metrics: Mapping[str, Any], checkpoint_path: str | Path | None) -> None:
            report = {**_numeric_metrics(metrics), "epoch": int(epoch)}
            if checkpoint_path is None or not Path(checkpoint_path).is_file():
                tune.report(report)
                return
            # Tune copies the directory into the trial's storage before report() returns.
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copy2(checkpoint_path, Path(tmp) / "last.pt")
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(tmp))

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            # Tune's checkpoint is the truth about where a trial is: files an interrupted attempt wrote before its
            # first report would make the target refuse the directory (or count epochs Tune never saw).
            stale = trial_dir / _RUN_SUBDIR
            if stale.is_dir():
                shutil.rmtree(stale)
            module.main(cfg, on_epoch=on_epoch)
            return
        # Resumed from Tune's checkpoint as the run's own last.pt: the target continues its own folder (a checkpoint
        # from elsewhere would make it refuse a folder the interrupted attempt wrote to).
        run_dir = trial_dir / _RUN_SUBDIR
        run_dir.mkdir(parents=True, exist_ok=True)
        with checkpoint.as_directory() as ckpt_dir:
            shutil.copy2(Path(ckpt_dir) / "last.pt", run_dir / "last.pt.tmp")
        os.replace(run_dir / "last.pt.tmp", run_dir / "last.pt")
        cfg["resume"] = str(run_dir / "last.pt")
        module.main(cfg, on_epoch=on_epoch)

    trial.__name__ = target  # Tune names trials after the function
    return trial


def _trial_run_root(ctx: Any) -> Path:
    """Where a trial's target run goes.

    Its directory in the sweep's storage when that is a local (or shared) filesystem, so that runs stopped early by
    ASHA keep their files beside Ray's; Ray's per-trial working directory otherwise.
    """
    import pyarrow.fs

    storage = ctx.get_storage()
    if storage is not None and isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return Path(storage.trial_fs_path)
    return Path(ctx.get_trial_dir())


def _trial_dirname(trial: Any) -> str:
    return str(trial.trial_id)


# ----------------------------------------------------------------------------------------------------------------------
# Progress


def _progress_callback(metric: str, mode: str, max_t: int) -> Any:
    from ray import tune

    class Progress(tune.Callback):
        """One line per trial epoch, start, early stop, error and completion."""

        def __init__(self) -> None:
            self.t0 = time.monotonic()
            self.best: float | None = None

        def _line(self, msg: str) -> None:
            m, s = divmod(int(time.monotonic() - self.t0), 60)
            print(f"[{m:02d}:{s:02d}] {msg}", flush=True)

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            cfg = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(trial.config.items()))
            self._line(f"{trial.trial_id} start  {cfg}")

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            value = result.get(metric)
            if isinstance(value, (int, float)):
                better = self.best is None or (value > self.best if mode == "max" else value < self.best)
                self.best = value if better else self.best
            self._line(
                f"{trial.trial_id} epoch {result.get('training_iteration')}/{max_t}  {metric}={_fmt(value)}"
                f"  (best {_fmt(self.best)}; {sum(t.status == 'RUNNING' for t in trials)} running, "
                f"{sum(t.status == 'TERMINATED' for t in trials)} done)"
            )

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            it = (trial.last_result or {}).get("training_iteration", 0)
            self._line(f"{trial.trial_id} {'done' if it >= max_t else 'stopped early by ASHA'} after {it} epoch(s)")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._line(f"{trial.trial_id} failed; see {trial.path}/error.txt")

    return Progress()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ----------------------------------------------------------------------------------------------------------------------
# Ray


def _init_ray(address: str | None, quiet: bool) -> None:
    import logging

    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": not quiet}
    if address:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"cannot join the Ray cluster at {address}: {one_line(e)}") from None
        return
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **kwargs)


def _check_resources(cpus: float, gpus: float) -> None:
    """Refuse a trial size the cluster can never place (Tune would wait for it forever)."""
    import ray

    have = ray.cluster_resources()
    if gpus > have.get("GPU", 0.0):
        raise ConfigError(f"--gpus-per-trial {gpus:g} but the Ray cluster has {have.get('GPU', 0.0):g} GPU(s)")
    if cpus > have.get("CPU", 0.0):
        raise ConfigError(f"--cpus-per-trial {cpus:g} but the Ray cluster has {have.get('CPU', 0.0):g} CPU(s)")


def _quiet_libraries() -> None:
    import logging

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # A resumed trial reports its restored iteration again; Optuna keeps the first value, which is the same one.
    warnings.filterwarnings("ignore", message="The reported value is ignored because this `step")
    for name in ("ray", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ----------------------------------------------------------------------------------------------------------------------
# Results


def _sweep_files(sweep_dir: Path) -> dict[str, Path]:
    return {
        "sweep": sweep_dir / "sweep.yaml",
        "best_config": sweep_dir / "best_config.yaml",
        "csv": sweep_dir / "trials.csv",
        "md": sweep_dir / "trials.md",
        "plot": sweep_dir / "trials.png",
    }


def _trial_statuses(results: Any) -> dict[str, str]:
    """Tune's status of every trial (TERMINATED, ERROR, or RUNNING/PENDING/PAUSED when the sweep was interrupted).

    The ResultGrid has no public per-trial status, hence its experiment analysis; empty if that ever moves.
    """
    try:
        return {str(t.trial_id): str(t.status) for t in results._experiment_analysis.trials}
    except AttributeError:
        return {}


def _summarise(results: Any, metric: str, mode: str, max_t: int, params: Sequence[str]) -> list[dict[str, Any]]:
    """One row per trial from the ResultGrid: its sampled values, epochs run, last and best metric, status."""
    statuses = _trial_statuses(results)
    rows = []
    for res in results:
        hist = res.metrics_dataframe
        values = [] if hist is None or metric not in hist else [float(v) for v in hist[metric].dropna()]
        last = res.metrics or {}
        epochs = int(last.get("training_iteration") or len(values))
        trial_id = last.get("trial_id") or Path(res.path).name
        if res.error is not None:
            status = "error"
        elif statuses.get(trial_id, "TERMINATED") not in ("TERMINATED", "ERROR"):
            status = "interrupted"
        elif epochs >= max_t:
            status = "completed"
        else:
            status = "stopped early"
        best = (max(values) if mode == "max" else min(values)) if values else float("nan")
        row = {"trial": trial_id, "status": status, "epochs": epochs}
        row.update({p: (res.config or {}).get(p) for p in params})
        row.update({f"last_{metric}": values[-1] if values else float("nan"), f"best_{metric}": best})
        row["_history"] = values
        row["_path"] = res.path
        rows.append(row)
    sign = -1.0 if mode == "max" else 1.0
    rows.sort(key=lambda r: (math.isnan(r[f"last_{metric}"]), sign * _nan_to(r[f"last_{metric}"])))
    return rows


def _nan_to(v: float, fill: float = 0.0) -> float:
    return fill if v != v else v


def _write_tables(rows: Sequence[dict[str, Any]], files: dict[str, Path], metric: str, title: str) -> None:
    import csv

    cols = [c for c in rows[0] if not c.startswith("_")] if rows else ["trial"]
    with open(files["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r[c] for c in cols})
    lines = [f"# {title}", "", "| rank | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    lines += [
        "",
        f'Sorted by the last reported `{metric}`; "stopped early" trials were cut by ASHA at a rung, '
        '"interrupted" ones continue with --resume.',
    ]
    files["md"].write_text("\n".join(lines) + "\n")


def _plot(rows: Sequence[dict[str, Any]], path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for r in rows:
        hist = r["_history"]
        if not hist:
            continue
        style = "-" if r["status"] == "completed" else ":"
        ax.plot(range(1, len(hist) + 1), hist, style, marker="o", markersize=3, label=f"{r['trial']} ({r['status']})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (training_iteration)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (dotted: stopped early, interrupted or failed)", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no trial reported an epoch: nothing to name
        ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# main


def _check_ranges(
    target_module: Any, base_cfg: dict[str, Any], space: SweepSpace, source: str, base_source: str = "the base config"
) -> None:
    """Every extreme value of every swept key, on top of the base config, must pass the target's own range checks
    (lr > 0, arch_warmup_epochs below epochs...): a trial that would refuse it fails only inside Ray, after the sweep
    has started, and resuming cannot fix the space. A refusal that the base config earns by itself, with the swept
    key at its base value, names the base config (``base_source``), not the swept key."""

    def check(overrides: dict[str, Any]) -> str | None:
        try:  # resolved as a trial resolves it (types coerced: YAML's '1e-3' is a number)
            target_module.check_values(resolve_config(target_module.DEFAULTS, overrides={**base_cfg, **overrides}))
        except ValueError as e:
            return str(e)
        return None

    failures = [
        (param.name, value, why)
        for param in space.params
        for value in param.extremes()
        if (why := check({param.name: value})) is not None
    ]
    if not failures:
        return
    name, value, why = failures[0]
    extremes = sum(len(param.extremes()) for param in space.params)
    if len(failures) == extremes and all(w == why for *_, w in failures) and check({}) == why:
        # Every extreme of every swept key is refused for the one reason the base config is refused alone.
        raise ConfigError(f"{base_source}: every trial would refuse it: {why}")
    raise ConfigError(f"{source}: params.{name} can be {value!r}, which a trial refuses: {why}")


def _preflight(target: str, target_module: Any, base_cfg: dict[str, Any], source: str) -> None:
    """What every trial would do first, done once here: the base config's values, its data (files, arrays, sizes)
    and its model (sizes that fit the patch, an arch or space file that exists and fits). A base config that fails
    them would fail every trial inside Ray, after the sweep has started, and resuming could not fix it."""
    from retrain.data import config_dataset_info

    cfg = base_cfg
    try:
        target_module.check_values(cfg)
        info = config_dataset_info(cfg)
        if target == "search":
            target_module.build_supernet(cfg, info.num_classes, info.in_chans)
        else:
            target_module.build_model(cfg, info)
    except (ValueError, OSError, TypeError) as e:
        raise ConfigError(f"{source}: every trial would fail: {one_line(e)}") from None


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _check_trial_size(cpus: float, gpus: float) -> None:
    if cpus <= 0 or gpus < 0:
        raise ConfigError(f"--cpus-per-trial must be > 0 and --gpus-per-trial >= 0, got {cpus:g} and {gpus:g}")


# Flags that describe a new sweep; --resume continues the one saved in sweep.yaml and cannot change them.
_NEW_SWEEP_FLAGS = ("target", "config", "space", "num_samples", "max_concurrent", "name")
# The trial size, which a resumed sweep may change (e.g. on a machine with other resources).
_RESOURCE_FLAGS = ("cpus_per_trial", "gpus_per_trial")


def main(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) a sweep and write its summary files.

    Args:
        cfg: keys of :data:`DEFAULTS`.

    Returns:
        ``sweep_dir``, ``best_config`` (path), ``best`` (the best trial's row), ``rows`` (all trials, best first),
        ``files`` (paths written) and ``finished`` (False when the sweep was interrupted).
    """
    cfg = {**DEFAULTS, **cfg}
    if cfg["resume"]:
        sweep_dir = Path(cfg["resume"]).expanduser().resolve()
        sweep_file = _sweep_files(sweep_dir)["sweep"]
        if not sweep_file.is_file():
            raise ConfigError(f"--resume {sweep_dir}: not a sweep directory (no {sweep_file.name}); give OUTPUT/NAME")
        saved = yaml.safe_load(sweep_file.read_text())
        given = {**cfg, "space": str(Path(cfg["space"]).resolve()) if cfg["space"] else cfg["space"]}
        fixed = [k for k in _NEW_SWEEP_FLAGS if cfg[k] not in (None, "") and given[k] != saved.get(k)]
        if fixed:
            flags = ", ".join(f"{_flag(k)} {cfg[k]}" for k in fixed)
            raise ConfigError(
                f"--resume continues the sweep {sweep_dir} as saved; it cannot take {flags}; drop them, or start a new "
                f"sweep with --name"
            )
        target, base_cfg, space_path = saved["target"], saved["base_config"], saved["space"]
        cpus, gpus = saved["cpus_per_trial"], saved["gpus_per_trial"]
        changed = {k: float(cfg[k]) for k in _RESOURCE_FLAGS if cfg[k] is not None and cfg[k] != saved[k]}
        if changed:
            cpus, gpus = changed.get("cpus_per_trial", cpus), changed.get("gpus_per_trial", gpus)
            _check_trial_size(cpus, gpus)
            now = ", ".join(f"{_flag(k)} {v:g}" for k, v in changed.items())
            print(f"resuming with {now} (saved: {', '.join(f'{saved[k]:g}' for k in changed)})", flush=True)
        num_samples, max_concurrent, workdir = saved["num_samples"], saved["max_concurrent"], saved["workdir"]
        space = load_sweep_space(space_path, importlib.import_module(TARGETS[target].module).DEFAULTS)
    else:
        cfg.update({k: v for k, v in NEW_SWEEP_DEFAULTS.items() if cfg[k] is None})
        target = cfg["target"]
        if target not in TARGETS:
            raise ConfigError(f"--target '{target}' is not one of {', '.join(TARGETS)}")
        if not cfg["config"]:
            raise ConfigError("give the target's base config with -c/--config")
        if not cfg["space"]:
            raise ConfigError("give the sweep space with --space SPACE.yaml")
        if int(cfg["num_samples"]) < 1:
            raise ConfigError(f"--num-samples must be >= 1, got {cfg['num_samples']}")
        _check_trial_size(float(cfg["cpus_per_trial"]), float(cfg["gpus_per_trial"]))
        target_module = importlib.import_module(TARGETS[target].module)
        defaults = target_module.DEFAULTS
        base_cfg = resolve_config(defaults, argv=["-c", str(cfg["config"])])
        try:  # every trial would refuse them
            check_model_kwargs(base_cfg["model_kwargs"], target_module.MODEL_ARGS_SET_BY_FLAGS)
        except ConfigError as e:
            raise ConfigError(f"{cfg['config']}: {e}") from None
        space = load_sweep_space(cfg["space"], defaults)
        if any(p.name == "val_frac" for p in space.params):
            raise ConfigError(
                "--space: 'val_frac' cannot be swept (trials on different validation sets do not compare)"
            )
        base_cfg, held_out_note = held_out_base(target, base_cfg)
        if held_out_note:
            print(held_out_note, flush=True)
        _check_ranges(target_module, base_cfg, space, cfg["space"], str(cfg["config"]))
        _preflight(target, target_module, base_cfg, str(cfg["config"]))
        space_path = str(Path(cfg["space"]).resolve())
        cpus, gpus = float(cfg["cpus_per_trial"]), float(cfg["gpus_per_trial"])
        num_samples, max_concurrent, workdir = int(cfg["num_samples"]), int(cfg["max_concurrent"] or 0), os.getcwd()
        name = cfg["name"] or f"{target}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}"
        sweep_dir = Path(cfg["output"]).expanduser().resolve() / name
        if (sweep_dir / "sweep.yaml").exists():
            raise ConfigError(
                f"{sweep_dir} already holds a sweep; continue it with --resume {sweep_dir} or pick --name"
            )
        saved = {
            "target": target,
            "space": space_path,
            "num_samples": num_samples,
            "max_concurrent": max_concurrent,
            "cpus_per_trial": cpus,
            "gpus_per_trial": gpus,
            "workdir": workdir,
            "base_config": base_cfg,
        }

    spec = target_for(target, base_cfg)
    files = _sweep_files(sweep_dir)
    epochs_key = "epochs"
    epoch_candidates = [int(base_cfg.get(epochs_key, 1) or 1)]
    for p in space.params:
        if p.name == epochs_key:
            epoch_candidates += [int(v) for v in p.extremes()]
    max_t = space.max_t or max(epoch_candidates)
    if space.grace_period > max_t:  # ASHA would assert inside Ray; refused before any file is written
        raise ConfigError(
            f"--space: asha.grace_period {space.grace_period} is longer than the longest trial ({max_t} epoch(s), "
            f"ASHA's max_t); lower grace_period to {max_t} or less, or give the trials more epochs"
        )

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    _quiet_libraries()
    _init_ray(cfg["address"], cfg["quiet"])
    _check_resources(cpus, gpus)
    if cfg["resume"]:
        if (cpus, gpus) != (saved["cpus_per_trial"], saved["gpus_per_trial"]):  # the next resume takes them too
            save_config({**saved, "cpus_per_trial": cpus, "gpus_per_trial": gpus}, files["sweep"])
    else:  # written only now: a sweep refused above leaves nothing behind that would block its --name
        sweep_dir.mkdir(parents=True, exist_ok=True)
        save_config(saved, files["sweep"])
    trainable = tune.with_resources(
        make_trainable(target, base_cfg, threads=max(1, int(cpus)), workdir=workdir), {"cpu": cpus, "gpu": gpus}
    )
    if cfg["resume"]:
        print(f"resuming sweep {sweep_dir}", flush=True)
        tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_errored=True)
    else:
        print(
            f"sweep {sweep_dir}: {num_samples} trials of {spec.module}, optimising {spec.metric} ({spec.mode}; "
            f"{spec.what}); ASHA max_t={max_t}, grace={space.grace_period}, rf={space.reduction_factor}",
            flush=True,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode,
                search_alg=OptunaSearch(seed=space.seed),
                scheduler=ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=max_t,
                    grace_period=space.grace_period,
                    reduction_factor=space.reduction_factor,
                ),
                num_samples=num_samples,
                max_concurrent_trials=max_concurrent or None,
                reuse_actors=True,  # one torch import per worker, not per trial
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=sweep_dir.name,
                storage_path=str(sweep_dir.parent),
                failure_config=tune.FailureConfig(max_failures=space.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[_progress_callback(spec.metric, spec.mode, max_t)],
                verbose=0,
            ),
        )
    results = tuner.fit()

    params = [p.name for p in space.params]
    rows = _summarise(results, spec.metric, spec.mode, max_t, params)
    finished = len(rows) >= num_samples and all(r["status"] != "error" for r in rows) and not _interrupted(results)
    title = f"Sweep {sweep_dir.name}: {spec.module}, {spec.metric} ({spec.mode}), {len(rows)} trials"
    if rows:
        _write_tables(rows, files, spec.metric, title)
        _plot(rows, files["plot"], spec.metric)
    best_row = next(
        (r for r in rows if r["status"] != "error" and r[f"last_{spec.metric}"] == r[f"last_{spec.metric}"]), None
    )
    if best_row is not None:
        best_cfg = dict(base_cfg)
        best_cfg.update({p: best_row[p] for p in params})
        module = importlib.import_module(spec.module)
        # Round-trip through the target's resolver: the file must be accepted by its -c as it is.
        best_cfg = resolve_config(module.DEFAULTS, overrides=best_cfg)
        save_config(best_cfg, files["best_config"])
    if rows:
        print(files["md"].read_text(), end="")
    if best_row is not None:
        print(
            f"best trial {best_row['trial']}: {spec.metric}={_fmt(best_row[f'last_{spec.metric}'])}; config "
            f"{files['best_config']}"
        )
        print(f"rerun it: python -m {spec.module} -c {shlex.quote(str(files['best_config']))}")
    if not finished:
        resume = f"python -m nas.tune --resume {shlex.quote(str(sweep_dir))}"
        failed = sum(r["status"] == "error" for r in rows)
        if failed and not _interrupted(results):
            print(f"the sweep did not finish: {failed} trial(s) failed (their errors: {files['md']}); after fixing the "
                  f"cause, retry them with: {resume}")  # fmt: skip
        else:
            print(f"the sweep did not finish; continue it with: {resume}")
    return {
        "sweep_dir": sweep_dir,
        "best_config": files["best_config"] if best_row is not None else None,
        "best": best_row,
        "rows": rows,
        "files": files,
        "finished": finished,
    }


def _interrupted(results: Any) -> bool:
    """True when Tune stopped before every trial ended (Ctrl-C, a driver stop)."""
    return any(s not in ("TERMINATED", "ERROR") for s in _trial_statuses(results).values())


def _parse_args(argv: Sequence[str] | None) -> dict[str, Any]:
    p = OneLineArgumentParser(
        prog="python -m nas.tune",
        description="Sweep the hyper-parameters of nas.search or retrain.train with Ray Tune + Optuna TPE + ASHA.",
    )
    p.add_argument("--target", choices=sorted(TARGETS), help="what each trial runs (default: retrain)")
    p.add_argument("-c", "--config", default="", help="base config of the target (its -c YAML)")
    p.add_argument("--space", default="", help="sweep space YAML (params with distributions)")
    p.add_argument("--num-samples", type=int, help="number of trials (default: 8)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as resources allow)")
    p.add_argument(
        "--gpus-per-trial",
        type=float,
        help="GPUs per trial (fractions share a GPU; default: 0; --resume may change it)",
    )
    p.add_argument(
        "--cpus-per-trial",
        type=float,
        help="CPUs per trial (also its torch threads; default: 1; --resume may change it)",
    )
    p.add_argument("--address", default=None, help="join this Ray cluster (default: start a local Ray)")
    p.add_argument("--resume", default=None, metavar="SWEEP_DIR", help="continue an interrupted sweep")
    p.add_argument("--output", default=DEFAULTS["output"], help="parent directory of the sweep")
    p.add_argument("--name", default=None, help="sweep directory name (default: <target>-<UTC time>)")
    p.add_argument("--quiet", action="store_true", help="hide the trials' own output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return vars(p.parse_args(argv))


def cli(argv: Sequence[str] | None = None) -> int:
    """The thin shell: parse, run, one-line errors (exit 2), tracebacks only with --debug."""
    args = _parse_args(argv)
    debug = args.pop("debug")
    if not debug:  # warnings as one line each, like the errors
        warnings.showwarning = one_line_warning
    try:
        out = main(args)
    except (ValueError, OSError) as e:  # OSError: files and folders (missing, read-only, full)
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0 if out["finished"] else 1


if __name__ == "__main__":
    sys.exit(cli())
