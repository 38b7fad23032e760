"""The comparison: the searched arch next to Vim, VMamba, LocalMamba-fixed and MambaOut, same recipe, several seeds.

``python -m retrain.compare -c CONFIG [--flag value ...]``

Every row of the table is one model trained with the same recipe (a ``retrain.train`` config file, so the same
epochs, optimizer, augmentation and data) for every seed in ``seeds``. A row is either run here (through
``retrain.train.main``) or collected from finished run directories, so GPU runs done elsewhere make the same table::

    train_config: configs/retrain/fmnist.yaml   # the recipe shared by every row
    arch: runs/search/arch.yaml                 # the searched arch (rows with `searched: true`)
    seeds: [0, 1, 2]
    slws_ablation: true                         # also train the searched arch(s) with shuffle_max 0
    models:
      - {name: searched, searched: true, overrides: {shuffle_max: 0.5}}
      - {name: vim, model: vim_mini}
      - {name: vmamba, model: vmamba_mini}
      - {name: local_fixed, model: local_fixed_vim_mini}
      - {name: mambaout, model: mambaout_femto, overrides: {drop_path: 0.1}}
      - {name: elsewhere, model: vim_mini, run_dirs: [gpu_runs/vim/seed0, gpu_runs/vim/seed1]}  # collect only

Sizes must match: every row's parameter count must lie within ``param_tolerance`` (±10 % by default) of the
reference row (the first searched row, else the first row); ``on_mismatch: refuse`` stops before training anything,
``flag`` marks the row in the table. Outputs, in ``OUTPUT/EXPERIMENT/``: ``runs/<row>/seed<S>/`` (each a normal
``retrain.train`` run plus its ``results.json``), ``comparison.csv``, ``comparison.md`` and ``comparison.png``.

The markdown says, for every searched row and every baseline, whether the searched arch is better and by how many
pooled standard deviations; a difference under ``noise_sigmas`` (2 by default) is reported as within noise.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import re
import signal
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from retrain.checkpoint import arch_difference
from retrain.config import (
    ConfigError,
    check_model_kwargs,
    defaults_help,
    nearest_key,
    one_line,
    plain_value,
    resolve_config,
    run_cli,
    save_config,
)
from retrain.data import config_dataset_info

__all__ = ["DEFAULTS", "Row", "collect_run", "main", "pick_gpu", "pooled_std", "summarise", "visible_gpus"]

DEFAULTS: dict[str, Any] = {
    "train_config": "",  # retrain.train YAML: the recipe every row shares ("" = retrain.train defaults)
    "arch": "",  # the searched arch file, used by rows with `searched: true`
    "models": [],  # rows: {name, model | arch | searched, overrides, run_dirs}
    "seeds": [0],  # seeds every row trains (mean ± std over them)
    "data_dir": "",  # overrides the recipe's data_dir ("" keeps it): the same recipe, data elsewhere
    "slws_ablation": False,  # add a shuffle_max=0 twin of every searched row that uses SLWS
    "output": "runs",  # parent folder of the comparison
    "experiment": "comparison",  # the comparison's folder name
    "collect_only": False,  # never train; build the table from the run directories that exist
    "train_rows": [],  # train only these rows (names; a searched row brings its no-SLWS twin), collect the rest
    "jobs": 1,  # trainings at a time: 1 runs them here one after another; N > 1 runs N processes side by side
    "param_tolerance": 0.10,  # rows' params within this fraction of the reference row's (else on_mismatch)
    "on_mismatch": "refuse",  # refuse | flag
    "metric": "final",  # final (last epoch's top-1) | best (best epoch's top-1, optimistic)
    "noise_sigmas": 2.0,  # a difference under this many σ (the seeds' spread) is called within noise
    "debug": False,  # show tracebacks instead of one-line errors
}

_ROW_KEYS = ("name", "model", "arch", "searched", "overrides", "run_dirs")
_RESULTS = "results.json"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "row"


@dataclass
class Row:
    """One line of the table: a model, its recipe overrides and what its seeds produced."""

    name: str
    overrides: dict[str, Any]  # retrain.train keys on top of the recipe (model or arch included)
    searched: bool
    run_dirs: list[str] = field(default_factory=list)
    twin_of: str | None = None  # the searched row this no-SLWS twin was made from
    params_expected: int | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return _slug(self.name)


# ----------------------------------------------------------------------------------------------------------------------
# Rows


def _parse_rows(cfg: dict[str, Any], train_defaults: dict[str, Any]) -> list[Row]:
    raw = cfg["models"]
    if not raw:
        raise ConfigError("'models' is empty: list the rows to compare, e.g. {name: vim, model: vim_mini}")
    rows: list[Row] = []
    for i, entry in enumerate(raw):
        where = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry, "model": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping like {{name: vim, model: vim_mini}}, got {entry!r}")
        for k in entry:
            if k not in _ROW_KEYS:
                near = difflib.get_close_matches(str(k), _ROW_KEYS, n=1)
                hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(_ROW_KEYS)}"
                raise ConfigError(f"{where}: unknown key '{k}'{hint}")
        _check_row_types(entry, where)
        overrides = dict(entry.get("overrides") or {})
        searched = bool(entry.get("searched", False)) or bool(entry.get("arch"))
        sources = [k for k in ("model", "arch", "searched") if entry.get(k)]
        if len(sources) != 1 and not (sources == ["arch", "searched"]):
            raise ConfigError(f"{where}: give exactly one of 'model', 'arch' or 'searched: true'")
        if entry.get("model"):
            overrides["model"] = str(entry["model"])
            _check_model_name(overrides["model"], f"{where} ({entry.get('name') or overrides['model']})")
        else:
            arch = entry.get("arch") or cfg["arch"]
            if not arch:
                raise ConfigError(f"{where} is the searched arch but no arch file is given; set 'arch' (or --arch)")
            overrides["arch"] = str(arch)
        name = str(entry.get("name") or overrides.get("model") or Path(str(overrides["arch"])).stem)
        for key in ("output", "experiment", "seed", "resume"):
            if key in overrides:
                raise ConfigError(f"{where}.overrides: '{key}' is set by the comparison for each seed")
        recipe_keys = sorted(k for k in overrides if k in _RECIPE_KEYS)
        if recipe_keys:
            raise ConfigError(
                f"{where}.overrides: {', '.join(recipe_keys)} belong to the recipe shared by every row; set them in "
                f"train_config (rows may set only the model, its kwargs, drop_path and shuffle_max)"
            )
        try:
            overrides = {k: v for k, v in resolve_config(train_defaults, overrides=overrides).items() if k in overrides}
        except ConfigError as e:
            raise ConfigError(f"{where} ({name}): {one_line(e).removeprefix('overrides: ')}") from None
        run_dirs = [str(d) for d in entry.get("run_dirs") or []]
        for d in run_dirs:
            # A mistyped folder would otherwise just leave the row short of seeds, with nothing saying why.
            if not Path(d).is_dir():
                what = "is not a folder" if Path(d).exists() else "does not exist"
                raise ConfigError(
                    f"{where} ({name}): run_dirs entry '{d}' {what} ({Path(d).resolve()}); give the run folder of "
                    f"one seed (the one holding args.yaml and summary.csv), relative to the current folder"
                )
        rows.append(Row(name=name, overrides=overrides, searched=searched, run_dirs=run_dirs))
    if cfg["slws_ablation"]:
        # Each searched row that uses SLWS gets a twin without it, placed right after it.
        with_twins: list[Row] = []
        for row in rows:
            with_twins.append(row)
            shuffle = row.overrides.get("shuffle_max")
            if row.searched and (shuffle if shuffle is not None else _recipe_shuffle(cfg, train_defaults)) > 0:
                twin = Row(f"{row.name} (no SLWS)", {**row.overrides, "shuffle_max": 0.0}, True, twin_of=row.name)
                with_twins.append(twin)
        rows = with_twins
    names = [r.slug for r in rows]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"two rows share the name {dupes[0]!r}; give each row a distinct 'name'")
    return rows


def _check_row_types(entry: dict[str, Any], where: str) -> None:
    """One line for a row field of the wrong type (a list where a name goes...), before it crashes or misleads."""
    for key in ("name", "model", "arch"):
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
            raise ConfigError(f"{where}.{key} must be a single name, got {value!r}")
    if "searched" in entry and not isinstance(entry["searched"], bool):
        raise ConfigError(f"{where}.searched must be true or false, got {entry['searched']!r}")
    overrides = entry.get("overrides")
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError(
            f"{where}.overrides must be a mapping of retrain.train keys, e.g. {{drop_path: 0.1}}, got {overrides!r}"
        )
    run_dirs = entry.get("run_dirs")
    # A lone string would be read letter by letter as folders.
    if run_dirs is not None and not (isinstance(run_dirs, list) and all(isinstance(d, str) for d in run_dirs)):
        raise ConfigError(f"{where}.run_dirs must be a list of run folders, e.g. [gpu/vim/seed0], got {run_dirs!r}")


def _check_model_name(model: str, where: str) -> None:
    """An unknown model stops here, naming its row, rather than in the first training (or never, when collecting)."""
    import timm

    import supernet  # noqa: F401  (registers our models with timm)

    if not timm.is_model(model):
        hint = nearest_key(model, timm.list_models()) or "; timm.list_models() lists the registered names"
        raise ConfigError(f"{where}: unknown model '{model}'{hint}")


def _recipe_shuffle(cfg: dict[str, Any], train_defaults: dict[str, Any]) -> float:
    return float(_recipe(cfg, train_defaults).get("shuffle_max", 0.0) or 0.0)


def _recipe(cfg: dict[str, Any], train_defaults: dict[str, Any]) -> dict[str, Any]:
    argv = ["-c", cfg["train_config"]] if cfg["train_config"] else None
    recipe = resolve_config(train_defaults, argv=argv)
    if cfg.get("data_dir"):
        recipe["data_dir"] = cfg["data_dir"]
    return recipe


# ----------------------------------------------------------------------------------------------------------------------
# Collecting finished runs


def _read_summary(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _float(v: Any) -> float | None:
    try:
        return None if v in (None, "") else float(v)
    except (TypeError, ValueError):
        return None


def collect_run(run_dir: str | Path, cost_if_missing: bool = True) -> dict[str, Any] | None:
    """Read one ``retrain.train`` run directory, finished or not.

    ``summary.csv`` (one row per epoch) gives the top-1 curve and the epochs done, ``args.yaml`` the planned epochs
    and the seed, and ``results.json`` (what ``retrain.train.main`` returned, saved by this module) the parameter
    count, FLOPs and training speed. A run made elsewhere without ``results.json`` still counts: its cost is then
    measured by building the model from ``args.yaml`` (``cost_if_missing``), and its speed is the mean of the
    ``img_s`` column.

    Returns:
        ``final_top1``, ``best_top1``, ``epochs``, ``planned_epochs``, ``params``, ``flops``, ``train_img_s``,
        ``interrupted``, ``seed``, ``config``, ``run_dir`` (None where unknown); ``None`` when the directory holds
        no finished epoch.
    """
    run_dir = Path(run_dir)
    config: dict[str, Any] = {}
    if (run_dir / "args.yaml").is_file():
        config = yaml.safe_load((run_dir / "args.yaml").read_text()) or {}
    results: dict[str, Any] = {}
    if (run_dir / _RESULTS).is_file():
        results = json.loads((run_dir / _RESULTS).read_text())
    # With EMA the checkpointed metric is the EMA model's: compare that one.
    col = "ema_top1" if config.get("model_ema") else "top1"
    curve: list[float] = []
    speeds: list[float] = []
    if (run_dir / "summary.csv").is_file():
        rows = _read_summary(run_dir / "summary.csv")
        curve = [v for v in (_float(r.get(col)) for r in rows) if v is not None]
        speeds = [v for v in (_float(r.get("img_s")) for r in rows) if v]
    if not curve and _float(results.get(col)) is not None:
        curve = [float(results[col])]
    if not curve:
        return None
    out: dict[str, Any] = {
        "final_top1": curve[-1],
        "best_top1": max(curve),
        "epochs": len(curve),
        "planned_epochs": config.get("epochs"),
        "params": results.get("params"),
        "flops": results.get("flops"),
        "train_img_s": results.get("train_img_s") or (sum(speeds) / len(speeds) if speeds else None),
        "interrupted": bool(results.get("interrupted", False)),
        "seed": config.get("seed"),
        "config": config,
        "run_dir": str(run_dir),
    }
    if out["params"] is None and cost_if_missing and config:
        out["params"], out["flops"] = _model_cost(config)
    return out


def _model_cost(config: dict[str, Any]) -> tuple[int | None, int | None]:
    """Parameters and FLOPs of the model a saved ``args.yaml`` describes (None, None if it cannot be built)."""
    from retrain import train as train_mod
    from retrain.engine import count_params_flops

    try:
        cfg = resolve_config(train_mod.DEFAULTS, overrides={k: v for k, v in config.items() if k in train_mod.DEFAULTS})
        info = config_dataset_info(cfg, need_files=False)
        model, _ = train_mod.build_model(cfg, info)
        params, flops = count_params_flops(model, info.img_size, info.in_chans)
    except (ValueError, FileNotFoundError, RuntimeError):
        return None, None
    return int(params), int(flops)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return str(value)


# ----------------------------------------------------------------------------------------------------------------------
# Statistics


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for fewer than two values)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def pooled_std(a: Sequence[float], b: Sequence[float]) -> float:
    """sqrt(((n_a - 1) s_a² + (n_b - 1) s_b²) / (n_a + n_b - 2)); NaN when either side has fewer than two seeds."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    _, sa = mean_std(a)
    _, sb = mean_std(b)
    return math.sqrt(((len(a) - 1) * sa**2 + (len(b) - 1) * sb**2) / (len(a) + len(b) - 2))


def verdict(searched: Sequence[float], baseline: Sequence[float], noise_sigmas: float) -> tuple[float, float, str]:
    """(difference of means, difference / pooled std, plain-words verdict) for searched minus baseline."""
    if not searched or not baseline:
        return math.nan, math.nan, "missing runs"
    diff = mean_std(searched)[0] - mean_std(baseline)[0]
    sd = pooled_std(searched, baseline)
    if math.isnan(sd):
        return diff, math.nan, f"cannot tell with {min(len(searched), len(baseline))} seed(s): no spread to compare to"
    if sd == 0:
        z = math.inf if diff > 0 else (-math.inf if diff < 0 else 0.0)
    else:
        z = diff / sd
    if abs(z) < noise_sigmas:
        return diff, z, f"within noise ({abs(z):.1f} σ < {noise_sigmas:g} σ)"
    return diff, z, f"{'beats' if z > 0 else 'loses to'} it by {abs(z):.1f} σ"


# ----------------------------------------------------------------------------------------------------------------------
# Tables


def summarise(rows: Sequence[Row], metric: str, recipe_shuffle: float = 0.0) -> list[dict[str, Any]]:
    """One dict per row: top-1 mean/std over seeds and the model's cost (``recipe_shuffle``: the recipe's SLWS)."""
    key = "final_top1" if metric == "final" else "best_top1"
    out = []
    for row in rows:
        vals = [float(r[key]) for r in row.runs if r.get(key) is not None]
        mean, std = mean_std(vals)
        params = next((r["params"] for r in row.runs if r.get("params")), row.params_expected)
        flops = next((r["flops"] for r in row.runs if r.get("flops")), None)
        speeds = [float(r["train_img_s"]) for r in row.runs if r.get("train_img_s")]
        out.append(
            {
                "model": row.name,
                "role": "searched" if row.searched else "baseline",
                "timm_name": row.overrides.get("model") or Path(str(row.overrides.get("arch", ""))).name,
                "top1_mean": mean,
                "top1_std": std,
                "seeds": len(vals),
                "params": params,
                "flops": flops,
                "train_img_s": sum(speeds) / len(speeds) if speeds else None,
                "shuffle_max": row.overrides.get("shuffle_max", recipe_shuffle),
                "_values": vals,
            }
        )
    return out


def _fmt_num(v: Any, scale: float = 1.0, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{float(v) / scale:.{digits}f}"


def _write_csv(table: Sequence[dict[str, Any]], path: Path) -> None:
    cols = list(dict.fromkeys([c for c in table[0] if not c.startswith("_")] + ["param_ratio", "size_ok"]))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        for r in table:
            writer.writerow({c: r.get(c) for c in cols})


def _markdown(
    table: Sequence[dict[str, Any]],
    cfg: dict[str, Any],
    recipe: dict[str, Any],
    ref_name: str,
    notes: Sequence[str] = (),
) -> str:
    metric_words = "final-epoch" if cfg["metric"] == "final" else "best-epoch (optimistic)"
    lines = [
        f"# Comparison: {cfg['experiment']}",
        "",
        f"Recipe: `{cfg['train_config'] or 'retrain.train defaults'}` (dataset {recipe.get('dataset')}, "
        f"{recipe.get('epochs')} epoch{'' if recipe.get('epochs') == 1 else 's'}, img {recipe.get('img_size')}), the "
        f"same for every row; seeds "
        f"{list(cfg['seeds'])}. Top-1 is the {metric_words} validation top-1 (%), mean ± sample std over seeds. "
        f"Sizes are matched to **{ref_name}** within ±{cfg['param_tolerance'] * 100:.0f} % of parameters.",
        "",
        "| model | role | SLWS P_max | top-1 (%) | seeds | params (M) | vs ref | FLOPs (M) | train img/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        std = "" if math.isnan(r["top1_std"]) else f" ± {r['top1_std']:.2f}"
        ratio = r.get("param_ratio")
        size = "n/a" if ratio is None else f"{(ratio - 1) * 100:+.1f} %" + ("" if r["size_ok"] else " ⚠ outside")
        lines.append(
            f"| {r['model']} | {r['role']} | {_fmt_num(r['shuffle_max'], digits=2)} | "
            f"{_fmt_num(r['top1_mean'])}{std} | {r['seeds']} | "
            f"{_fmt_num(r['params'], 1e6, 3)} | {size} | {_fmt_num(r['flops'], 1e6, 1)} | "
            f"{_fmt_num(r['train_img_s'], 1, 0)} |"
        )
    searched = [r for r in table if r["role"] == "searched"]
    baselines = [r for r in table if r["role"] == "baseline"]
    if searched and baselines:
        lines += [
            "",
            "## Does the searched arch beat each baseline?",
            "",
            f"Δ = searched − baseline (top-1 points); σ = pooled sample std of the two rows; |Δ| < "
            f"{cfg['noise_sigmas']:g} σ is called within noise.",
            "",
            "| searched | baseline | Δ top-1 | pooled σ | Δ / σ | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for s in searched:
            for b in baselines:
                diff, z, words = verdict(s["_values"], b["_values"], cfg["noise_sigmas"])
                sd = pooled_std(s["_values"], b["_values"])
                zs = "n/a" if math.isnan(z) else (f"{z:+.1f}" if math.isfinite(z) else ("+∞" if z > 0 else "−∞"))
                lines.append(
                    f"| {s['model']} | {b['model']} | {_fmt_num(diff, digits=2)} | {_fmt_num(sd)} | {zs} | {words} |"
                )
    missing = [r["model"] for r in table if r["seeds"] < len(cfg["seeds"])]
    if missing:
        lines += ["", f"Rows with fewer seeds than asked ({len(cfg['seeds'])}): {', '.join(missing)}."]
    if any(not r["size_ok"] for r in table):
        lines += ["", "⚠ outside: parameter count outside the size tolerance; that row is not a matched comparison."]
    for note in notes:
        lines += ["", f"⚠ {note}."]
    return "\n".join(lines) + "\n"


def _plot(table: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in table]
    means = [0.0 if math.isnan(r["top1_mean"]) else r["top1_mean"] for r in table]
    errs = [0.0 if math.isnan(r["top1_std"]) else r["top1_std"] for r in table]
    colors = ["tab:red" if r["role"] == "searched" else "tab:gray" for r in table]
    fig, ax = plt.subplots(figsize=(1.3 + 1.1 * len(table), 3.8), dpi=110)
    off = [not r["size_ok"] for r in table]  # params outside the tolerance: hatched, and said in the label
    ax.bar(range(len(table)), means, yerr=errs, capsize=4, color=colors, hatch=["//" if o else "" for o in off])
    finite = [m for m, r in zip(means, table) if r["seeds"]]
    if finite:
        lo = max(0.0, min(finite) - 3 * (max(errs) + 1))
        ax.set_ylim(lo, min(100.0, max(finite) + 3 * (max(errs) + 1)))
    labels = [
        f"{n}\n(n={r['seeds']}"
        + ("" if r["param_ratio"] is None or not o else f", params {(r['param_ratio'] - 1) * 100:+.0f} %")
        + ")"
        for n, r, o in zip(names, table, off)
    ]
    ax.set_xticks(range(len(table)), labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("top-1 (%)")
    hatched = ";\nhatched: params outside the tolerance" if any(off) else ""
    ax.set_title(f"{title}\nmean ± std over seeds; red: searched{hatched}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# main


def _count_params(train_mod: Any, train_cfg: dict[str, Any], row_name: str) -> int:
    """The parameter count of a row's model, built the way retrain.train builds it (no training)."""
    info = config_dataset_info(train_cfg)
    try:
        model, _ = train_mod.build_model(train_cfg, info)
    except ValueError as e:  # an arch file missing or not fitting its model: say which of the rows it is
        raise ConfigError(f"row '{row_name}': {one_line(e)}") from None
    return int(sum(p.numel() for p in model.parameters()))


# The recipe keys that must agree between rows for the table to be a fair comparison.
# The recipe every row shares: a row may not override these, and a collected run that differs is flagged.
_RECIPE_KEYS = (
    "dataset",
    "img_size",
    "in_chans",
    "epochs",
    "batch_size",
    "opt",
    "lr",
    "weight_decay",
    "sched",
    "warmup_epochs",
    "warmup_lr",
    "min_lr",
    "smoothing",
    "mixup",
    "cutmix",
    "mixup_prob",
    "clip_grad",
    "model_ema",
    "model_ema_decay",
    "num_samples",
)


def _recipe_differences(run: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    config = run.get("config") or {}
    return [
        f"{k} {config[k]!r} (recipe {expected[k]!r})"
        for k in _RECIPE_KEYS
        if k in config and k in expected and config[k] != expected[k]
    ]


# The train keys besides the model name and arch that make a row's model what it is (the constructor's arguments).
_MODEL_KEYS = ("model_kwargs", "patch_size", "drop_path", "shuffle_max")


def _row_model(config: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """The model name and arch (a dict) a train config builds, as ``retrain.train`` resolves them: an arch file's
    own model wins over ``model``. The arch is read from its file as it is now."""
    from search_spaces import load_arch

    if config.get("arch"):
        arch = load_arch(config["arch"]).to_dict()
        return arch.get("model") or config.get("model") or None, arch
    return config.get("model") or None, None


def _trained_model(run: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """The model name and arch a run trained: its checkpoint's record (read lazily: no weights are loaded), else
    what its ``args.yaml`` names (the arch file as it reads now); ``(None, None)`` where neither says."""
    import torch

    for name in ("last.pt", "best.pt"):
        path = Path(run["run_dir"]) / name
        if path.is_file():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # a damaged file says nothing here; retrain.train refuses it when it resumes
                continue
            spec = state.get("model_spec") if isinstance(state, dict) else None
            if isinstance(spec, dict) and spec.get("name"):
                return spec["name"], spec.get("arch")
    try:
        return _row_model(run.get("config") or {})
    except (OSError, ValueError):  # its arch file is gone or no longer an arch
        return None, None


def _model_differences(
    run: dict[str, Any],
    expected: dict[str, Any],
    want: tuple[str | None, dict[str, Any] | None],
    train_defaults: dict[str, Any],
) -> list[str]:
    """How the model a run trained differs from a row's (``expected``, its train config; ``want``, its model name and
    arch, None where unknown): the name, the arch's orders (as trained) and :data:`_MODEL_KEYS`, each as
    ``key saved (row asked)``; empty when it is the row's model."""
    config = run.get("config") or {}
    want_name, want_arch = want
    have_name, have_arch = _trained_model(run)
    diffs = []
    if have_name and want_name and have_name != want_name:
        diffs.append(f"model {have_name!r} (row {want_name!r})")
    arch = arch_difference(have_arch, want_arch) if have_name and want_name else None
    if arch:
        diffs.append(f"arch {arch}")
    for k in _MODEL_KEYS:
        have, want = config.get(k, train_defaults.get(k)), expected.get(k, train_defaults.get(k))
        if k in config and plain_value(have) != plain_value(want):
            diffs.append(f"{k} {have!r} (row {want!r})")
    return diffs


def main(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run or collect every row × seed, then write the comparison table, CSV and plot.

    Args:
        cfg: keys of :data:`DEFAULTS`.

    Returns:
        ``table`` (one dict per row), ``markdown`` (the text), and the paths ``md``, ``csv``, ``plot`` (None when no
        row has a finished run, so nothing is plotted), ``dir``.
    """
    from retrain import train as train_mod

    cfg = {**DEFAULTS, **cfg}
    if cfg["on_mismatch"] not in ("refuse", "flag"):
        raise ConfigError(f"on_mismatch must be 'refuse' or 'flag', got {cfg['on_mismatch']!r}")
    if cfg["metric"] not in ("final", "best"):
        raise ConfigError(f"metric must be 'final' or 'best', got {cfg['metric']!r}")
    if not cfg["seeds"]:
        raise ConfigError("seeds is empty; give at least one seed")
    if isinstance(cfg["jobs"], bool) or cfg["jobs"] < 1:
        raise ConfigError(f"--jobs {cfg['jobs']!r} is out of range; use a value >= 1")
    repeated = sorted({s for s in cfg["seeds"] if list(cfg["seeds"]).count(s) > 1}, key=str)
    if repeated:
        # One run folder per seed: a repeated seed would be trained once and counted twice, faking a zero spread.
        raise ConfigError(
            f"seeds lists {', '.join(map(str, repeated))} more than once; give each seed once, e.g. seeds: [0, 1, 2]"
        )
    train_defaults = dict(train_mod.DEFAULTS)
    recipe = _recipe(cfg, train_defaults)
    rows = _parse_rows(cfg, train_defaults)
    for row in rows:  # before anything is written or trained: a run that would refuse them fails every seed
        try:
            check_model_kwargs({**recipe, **row.overrides}.get("model_kwargs") or {}, train_mod.MODEL_ARGS_SET_BY_FLAGS)
        except ConfigError as e:
            raise ConfigError(f"row '{row.name}': {e}") from None
    cfg["train_rows"] = [str(n) for n in cfg["train_rows"]]  # a row named "1" or "yes" on the command line
    unknown = [n for n in cfg["train_rows"] if n not in {r.name for r in rows}]
    if unknown:
        raise ConfigError(f"train_rows: no row named {', '.join(map(repr, unknown))}; rows are "
                          f"{', '.join(repr(r.name) for r in rows)}")  # fmt: skip
    out_dir = Path(cfg["output"]) / cfg["experiment"]

    ref = next((r for r in rows if r.searched), rows[0])
    if not cfg["collect_only"]:
        # Size check before any training: a mismatched table is not worth the GPU time.
        for row in rows:
            row.params_expected = _count_params(train_mod, {**recipe, **row.overrides}, row.name)
            print(f"{row.name:<28} {row.params_expected / 1e6:8.3f} M params", flush=True)
        _check_sizes(rows, ref, cfg, [r.params_expected for r in rows])

    notes: list[str] = []
    stale: list[str] = []  # this comparison's own runs, finished or not, that another recipe made
    pending: list[tuple[Row, int, dict[str, Any], Path]] = []
    for row in rows:
        expected = {**recipe, **row.overrides}
        try:
            want = _row_model(expected)
        except (OSError, ValueError) as e:  # collecting only (training read the arch file above): nothing to check
            want = (None, None)
            notes.append(
                f"{row.name}: its arch file is unreadable ({one_line(e, 120)}); its runs' models are unchecked"
            )
        for seed in cfg["seeds"]:
            run_dir = out_dir / "runs" / row.slug / f"seed{seed}"
            got = collect_run(run_dir, cost_if_missing=cfg["collect_only"])
            if got is not None and _finished(got):
                model_diffs = _model_differences(got, expected, want, train_defaults)
                if model_diffs:  # never tabulated under this row, whatever the rest of its recipe
                    if not cfg["collect_only"]:
                        stale.append(f"{row.name} seed {seed} trained another model ({', '.join(model_diffs)})")
                    notes.append(f"{row.name} seed {seed} ({run_dir}) trained another model, left out: "
                                 f"{', '.join(model_diffs)}")  # fmt: skip
                    continue
            if got is None or not _finished(got):
                for d in row.run_dirs:
                    other = collect_run(d, cost_if_missing=True)
                    if not (other and other.get("seed") == seed and _finished(other)):
                        continue
                    model_diffs = _model_differences(other, expected, want, train_defaults)
                    if not model_diffs:
                        got = other
                        break
                    notes.append(f"{row.name} seed {seed} ({d}) trained another model, left out: "
                                 f"{', '.join(model_diffs)}")  # fmt: skip
            if got is not None and _finished(got):
                diffs = _recipe_differences(got, recipe)
                if diffs:
                    notes.append(f"{row.name} seed {seed} ({got['run_dir']}) ran another recipe: {', '.join(diffs)}")
                    if not cfg["collect_only"] and Path(got["run_dir"]) == run_dir:
                        stale.append(f"{row.name} seed {seed} ({', '.join(diffs)})")
                row.runs.append(got)
                continue
            if cfg["collect_only"] or not _trains(row, cfg["train_rows"]):
                continue
            if (run_dir / "args.yaml").is_file():  # an unfinished run of its own, which would resume in place
                saved = yaml.safe_load((run_dir / "args.yaml").read_text()) or {}
                diffs = _recipe_differences({"config": saved}, recipe)
                diffs += _model_differences({"config": saved, "run_dir": str(run_dir)}, expected, want, train_defaults)
                if diffs:
                    stale.append(f"{row.name} seed {seed}, unfinished ({', '.join(diffs)})")
            train_cfg = resolve_config(
                train_defaults,
                overrides={
                    **expected,
                    "seed": int(seed),
                    "output": str(out_dir / "runs" / row.slug),
                    "experiment": f"seed{seed}",
                    "resume": "auto" if run_dir.is_dir() else "",  # its own folder: continue or restart it
                },
            )
            pending.append((row, int(seed), train_cfg, run_dir))
    if stale:
        # Training the rest next to them would make a table whose header names a recipe some rows did not run, and
        # resuming an unfinished one would train it under two recipes.
        raise ConfigError(
            f"{len(stale)} run(s) of this comparison under {(out_dir / 'runs').resolve()} ran another recipe or "
            f"model: {'; '.join(stale[:3])}{' ...' if len(stale) > 3 else ''}; choose a new --experiment, restore "
            f"that recipe and model, or pass --collect-only to tabulate the finished runs as they are (another "
            f"recipe flagged, another model left out)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config({k: v for k, v in cfg.items()}, out_dir / "compare.yaml")
    if cfg["jobs"] > 1 and len(pending) > 1:
        _run_parallel(pending, cfg["jobs"])
    else:
        for row, seed, train_cfg, run_dir in pending:
            print(f"== {row.name}, seed {seed} -> {run_dir}", flush=True)
            result = train_mod.main(train_cfg)
            (run_dir / _RESULTS).write_text(json.dumps(_jsonable(result), indent=1, sort_keys=True) + "\n")
            if result.get("interrupted"):
                stop = KeyboardInterrupt(f"{row.name} seed {seed} was interrupted; rerun the same command to continue")
                stop.signum = int(result.get("signal") or signal.SIGINT)  # type: ignore[attr-defined]
                raise stop
    for row, seed, _, run_dir in pending:
        got = collect_run(run_dir, cost_if_missing=True)
        if got is None or not _finished(got):
            raise ValueError(f"{row.name} seed {seed} did not finish (see {run_dir}); rerun the same command")
        row.runs.append(got)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)

    table = summarise(rows, cfg["metric"], float(recipe.get("shuffle_max", 0.0)))
    ref_params = next((t["params"] for t in table if t["model"] == ref.name), None)
    for t in table:
        t["param_ratio"] = (t["params"] / ref_params) if (t["params"] and ref_params) else None
        t["size_ok"] = t["param_ratio"] is None or abs(t["param_ratio"] - 1) <= cfg["param_tolerance"]
    if cfg["collect_only"]:
        _check_sizes(rows, ref, cfg, [t["params"] for t in table])

    md = _markdown(table, cfg, recipe, ref.name, notes)
    paths = {"md": out_dir / "comparison.md", "csv": out_dir / "comparison.csv", "plot": out_dir / "comparison.png"}
    paths["md"].write_text(md)
    _write_csv(table, paths["csv"])
    skipped = ""
    if any(t["seeds"] for t in table):
        _plot(table, paths["plot"], cfg["experiment"])
    else:
        earlier = " (the one there is from an earlier call)" if paths["plot"].exists() else ""
        skipped = f"; no {paths['plot'].name}{earlier}: no row has a finished run to plot"
        paths["plot"] = None
    print(md, end="")
    print(f"written: {', '.join(str(p) for p in paths.values() if p is not None)}{skipped}")
    return {"table": table, "markdown": md, "dir": out_dir, **paths}


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (empty without CUDA)."""
    import os

    import torch

    if not torch.cuda.is_available():
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[: torch.cuda.device_count()] if listed else [str(i) for i in range(torch.cuda.device_count())]


def pick_gpu(running: dict[str, int]) -> str:
    """The GPU with the fewest runs on it (the first such in order): spreads side-by-side runs evenly."""
    return min(running, key=lambda g: (running[g], list(running).index(g)))


def _say(line: str) -> None:
    """One progress line in one write: print() writes the text and its newline separately, so lines printed by two
    threads at once could interleave into one ("== start a== start b") and a reader would miss one."""
    sys.stdout.write(f"{line}\n")
    sys.stdout.flush()


def _run_parallel(pending: Sequence[tuple[Row, int, dict[str, Any], Path]], jobs: int) -> None:
    """Train several (row, seed) runs side by side, each its own ``retrain.train`` process.

    With several GPUs visible, each run is pinned (``CUDA_VISIBLE_DEVICES``) to the GPU running the fewest at its
    start. Each run's resolved config goes to ``runs/<row>/seed<S>.yaml`` and its output to ``runs/<row>/seed<S>.log``.
    A SIGTERM to this process (a scheduler's, ``timeout``'s) is passed on to the running trainings, which save their
    checkpoints; none starts after it, and this process then stops as interrupted (Ctrl-C reaches them all anyway),
    unless every training had already finished when it came.
    """
    import os
    import subprocess
    import threading
    from concurrent.futures import ThreadPoolExecutor, wait

    gpus = visible_gpus()
    running = {g: 0 for g in gpus}
    lock = threading.Lock()
    procs: set[subprocess.Popen] = set()
    stopped: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        with lock:
            stopped.append(signum)
            for proc in procs:
                proc.send_signal(signum)

    def one(item: tuple[Row, int, dict[str, Any], Path]) -> tuple[str, int, int | None]:
        row, seed, train_cfg, run_dir = item
        cfg_path = save_config(train_cfg, run_dir.parent / f"seed{seed}.yaml")
        log_path = run_dir.parent / f"seed{seed}.log"
        env, gpu = dict(os.environ), None
        with lock:
            if stopped:
                return row.name, seed, None
            if len(gpus) > 1:
                gpu = pick_gpu(running)
                running[gpu] += 1
                env["CUDA_VISIBLE_DEVICES"] = gpu
        where = f" on GPU {gpu}" if gpu is not None else ""
        _say(f"== start {row.name}, seed {seed}{where} -> {run_dir} (log {log_path})")
        try:
            with open(log_path, "a") as log, lock:
                if stopped:  # the signal came while this one was being set up
                    return row.name, seed, None
                proc = subprocess.Popen(
                    [sys.executable, "-m", "retrain.train", "-c", str(cfg_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
                procs.add(proc)
            rc = proc.wait()
            with lock:
                procs.discard(proc)
        finally:
            if gpu is not None:
                with lock:
                    running[gpu] -= 1
        _say(f"== done  {row.name}, seed {seed}: exit {rc}")
        return row.name, seed, rc

    in_main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    previous = signal.signal(signal.SIGTERM, forward) if in_main else None
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(one, item) for item in pending]
            # Wait in short slices: the kernel may deliver the SIGTERM to a worker thread (blocked in waitpid), and
            # Python runs the handler only in the main thread once it is back in the interpreter. A wait without a
            # timeout would hold the handler, and so the stop, until a training ended on its own.
            while not all(f.done() for f in futures):
                wait(futures, timeout=0.2)
            results = [f.result() for f in futures]
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    # rc None: never started; 128 + signal: stopped by the forwarded signal. A signal that came once every training
    # had ended stops nothing: the table is written as without it.
    if stopped and any(rc != 0 for _, _, rc in results):
        stop = KeyboardInterrupt("stopped by a signal; the runs saved checkpoints; rerun the same command to continue")
        stop.signum = stopped[0]  # type: ignore[attr-defined]
        raise stop
    if stopped:
        print(f"== signal {stopped[0]} came after every training had finished; writing the table", flush=True)
    failed = [(n, s, rc) for n, s, rc in results if rc]
    if failed:
        what = ", ".join(f"{n} seed {s} (exit {rc})" for n, s, rc in failed)
        # ValueError: one line from the CLI, as the trainings' own errors are in their logs
        raise ValueError(f"training failed for {what}; see the seed<S>.log files next to their run directories")


def _trains(row: Row, names: Sequence[str]) -> bool:
    """Whether ``row`` is trained here: every row when ``names`` is empty, else the named ones and their twins."""
    return not names or row.name in names or row.twin_of in names


def _finished(run: dict[str, Any]) -> bool:
    """A run counts once it has a top-1, was not interrupted, and (when known) ran all its planned epochs."""
    if run.get("final_top1") is None or run.get("interrupted"):
        return False
    planned, done = run.get("planned_epochs"), run.get("epochs")
    return planned is None or done is None or int(done) >= int(planned)


def _check_sizes(rows: Sequence[Row], ref: Row, cfg: dict[str, Any], params: Sequence[int | None]) -> None:
    ref_params = params[list(rows).index(ref)]
    if not ref_params:
        return
    bad = []
    for row, p in zip(rows, params):
        if p and abs(p / ref_params - 1) > cfg["param_tolerance"]:
            bad.append(f"{row.name} {p / 1e6:.3f} M ({(p / ref_params - 1) * 100:+.0f} %)")
    if not bad:
        return
    msg = (
        f"parameter counts differ from {ref.name} ({ref_params / 1e6:.3f} M) by more than "
        f"±{cfg['param_tolerance'] * 100:.0f} %: {'; '.join(bad)}"
    )
    if cfg["on_mismatch"] == "refuse":
        raise ConfigError(f"{msg}; resize those models (overrides) or set on_mismatch: flag")
    print(f"warning: {msg}; flagged in the table", file=sys.stderr)


def cli(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run_cli(
            main,
            DEFAULTS,
            argv,
            description="Compare the searched arch with the baselines over seeds.",
            helps=defaults_help(__file__),
        )
    except KeyboardInterrupt as e:
        # A stop is not a crash: the run saved its checkpoint and a rerun continues, which one line says; the exit
        # status is the shell's for that signal (130 for Ctrl-C, 143 for SIGTERM), so a calling script stops too.
        if "--debug" in argv:
            traceback.print_exc()
        print(f"interrupted: {one_line(e) or 'rerun the same command to continue'}", file=sys.stderr)
        return 128 + int(getattr(e, "signum", signal.SIGINT))


if __name__ == "__main__":
    sys.exit(cli())
