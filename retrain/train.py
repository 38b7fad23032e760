"""Train a model from scratch: a derived arch file, one of our models, or any timm model.

    python -m retrain.train -c configs/demo/retrain.yaml --arch arch.yaml --shuffle-max 0.5
    python -m retrain.train --model mambaout_femto --dataset fashion_mnist --data-dir fashion_mnist.npz --img-size 28
    torchrun --nproc-per-node 2 -m retrain.train -c CONFIG           # DDP on every visible GPU (gloo on CPU)
    python -m retrain.train --eval-only runs/NAME/best.pt             # re-evaluate a checkpoint

The recipe is timm's: ``create_optimizer_v2`` / ``create_scheduler_v2`` (AdamW, cosine, warm-up, stepped per update),
Mixup/CutMix with soft-target cross-entropy or label smoothing, ``ModelEmaV3``, drop path through the model's
``drop_path_rate``, gradient clipping, bf16 autocast on CUDA. SLWS (``--shuffle-max P``, ShuffleMamba's stochastic
layer-wise shuffle) is a kwarg of our models.

Writes ``<output>/<experiment>/``: ``args.yaml``, ``summary.csv`` (one row per epoch), ``tb/`` (TensorBoard),
``last.pt``, ``best.pt`` and the top ``checkpoint_hist`` ``checkpoint-<epoch>.pt`` by the eval metric. A run
directory that already holds checkpoints, or another run's files without them, is never overwritten: pass
``--resume auto`` or a new ``--experiment``.
SIGINT/SIGTERM save ``last.pt`` at the next step boundary and exit cleanly; ``--resume auto`` continues from there
(mid-epoch, same data order). ``--checkpoint-interval N`` also saves ``last.pt`` every N steps, so that a hard kill
(SIGKILL, a lost node) costs at most N steps: the resumed run replays them bit for bit.

A step whose loss or gradients are not finite is skipped (all ranks agree) and counted (``train/bad_steps`` in
TensorBoard); ``--rollback-after N`` such steps in a row reload the weights and optimizer state of ``last.pt`` and
move on with the next batches; ``--max-bad-steps M`` in all stop the run with a message naming the step.

Validation: by default the per-epoch metrics (and so ``best.pt``) come from the dataset's test split. ``--val-frac F``
holds out a seeded fraction F of the train split (without augmentation) for them instead and trains on the rest; the
final model (and its EMA) is then evaluated once on the test split at the end, as ``test_*`` in ``test.json``.
"""

from __future__ import annotations

import difflib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Dataset, Subset

from kernels import CHANNEL_SUMS, set_channel_sums
from retrain.checkpoint import (
    CheckpointKeeper,
    check_resume_recipe,
    check_resume_spec,
    check_resume_steps,
    load_checkpoint,
    refuse_existing_run,
    resolve_resume,
    resolved_model_args,
    save_checkpoint,
)
from retrain.config import MODEL_ARGS_SET_BY_FLAGS as TRAINER_MODEL_ARGS
from retrain.config import (
    check_model_kwargs,
    defaults_help,
    given_settings,
    resolve_config,
    run_cli,
    save_config,
    unknown_kwarg_hint,
)
from retrain.data import DatasetInfo, build_dataset, build_loader, split_train
from retrain.engine import (
    COMPILE_MODES,
    BadStepGuard,
    RunLogger,
    StopFlag,
    amp_dtype_for,
    autocast,
    check_trainer_values,
    count_params_flops,
    evaluate,
    format_metrics,
    gather_rng_states,
    init_distributed,
    print_rank0,
    resume_keys,
    seed_everything,
    set_rng_state,
    unwrap_model,
)

__all__ = ["DEFAULTS", "build_model", "check_values", "main", "model_from_spec"]

# Constructor arguments the trainer sets from its flags or the data ("": the data), refused in model_kwargs.
MODEL_ARGS_SET_BY_FLAGS = {**TRAINER_MODEL_ARGS, "shuffle_max": "--shuffle-max", "arch": "--arch"}

DEFAULTS: dict[str, Any] = {
    # what to train
    "model": "",  # a timm name (ours or timm's); ignored when `arch` is given
    "model_kwargs": {},  # extra constructor arguments, e.g. {embed_dim: 160} (CLI: --model-kwargs embed_dim=160)
    "arch": "",  # a derived arch YAML (from nas.vis_search_prob); builds its `model` entry point
    "patch_size": 0,  # 0 = the model's default
    "drop_path": 0.0,  # stochastic depth rate (our models: drop_path_rate)
    "shuffle_max": 0.0,  # SLWS P_max (0 disables); our models only
    # data
    "dataset": "synthetic",  # synthetic | fashion_mnist | mnist | cifar10 | cifar100 | imagefolder
    "data_dir": "",  # the dataset's folder (an .npz file for fashion_mnist/mnist also works)
    "img_size": 32,  # input size in pixels (images are resized to it)
    "in_chans": 0,  # 0 = the data's own channels
    "num_samples": 0,  # synthetic only: train size (0 = 4096; val is a quarter)
    "download": False,  # let torchvision download cifar10/cifar100 into data_dir
    "workers": 0,  # 0 keeps augmentation on the main RNG (exact resume); raise it for image folders
    "val_frac": 0.0,  # > 0: validate on this seeded fraction of the train split; test split only at the end
    # optimization
    "epochs": 10,  # training epochs (the LR schedule spans them)
    "batch_size": 64,  # images per step and process
    "opt": "adamw",  # a timm optimizer name (timm.optim.create_optimizer_v2): adamw, sgd, lamb, ...
    "lr": 1e-3,  # peak learning rate
    "weight_decay": 0.05,  # AdamW/SGD weight decay (norms, biases and the SSM's A, D left out)
    "momentum": 0.9,  # SGD momentum
    "sched": "cosine",  # a timm scheduler name (timm.scheduler.create_scheduler_v2): cosine, step, ...
    "warmup_epochs": 1,  # linear LR warm-up from warmup_lr
    "warmup_lr": 1e-5,  # LR at the start of the warm-up
    "min_lr": 1e-5,  # LR at the end of the schedule
    "clip_grad": 0.0,  # max gradient norm (0 = off)
    "smoothing": 0.1,  # label smoothing
    "mixup": 0.0,  # timm Mixup alpha (0 = off)
    "cutmix": 0.0,  # timm CutMix alpha (0 = off)
    "mixup_prob": 1.0,  # probability of mixing a batch when mixup or cutmix is on
    "model_ema": False,  # keep a timm ModelEmaV3 of the weights (evaluated too)
    "model_ema_decay": 0.999,  # its decay per step
    "amp": True,  # bf16 autocast on CUDA; CPU always runs fp32
    "compile": "",  # torch.compile mode for the training and eval forward ("" = eager; e.g. default, reduce-overhead)
    "scan_sums": "fixed",  # scan backward dB/dC channel sums (GPU bf16, process-wide): fixed(-point)|butterfly|packed
    "rollback_after": 5,  # non-finite steps in a row that roll back to the last checkpoint (0 = never)
    "max_bad_steps": 20,  # non-finite steps in all (each is skipped) after which the run stops
    # run
    "seed": 0,  # seeds every RNG (weights, data order, augmentation, SLWS)
    "output": "runs",  # parent folder of the run directory
    "experiment": "",  # "" = <model>-<dataset>-s<seed>
    "resume": "",  # a checkpoint path, or "auto" (newest complete checkpoint of this run)
    "eval_only": "",  # a checkpoint path: evaluate it and exit
    "checkpoint_hist": 3,  # best checkpoints kept by eval_metric (0: only last.pt)
    "checkpoint_interval": 0,  # also save last.pt every this many steps (0 = at epoch ends only)
    "eval_metric": "top1",  # what ranks checkpoints: top1 | top5 | loss
    "log_interval": 50,  # a progress line and TensorBoard scalars every this many steps
    "device": "auto",  # auto (CUDA if present) | cpu | cuda | cuda:N
    "dist_timeout": 600.0,  # seconds a rank waits for the others before the run stops (a rank died)
    "debug": False,  # show tracebacks instead of one-line errors
    # test hooks: NaN loss / gradient at these checks (0-based, every checked step of the process counts)
    "debug_nan_loss_at": [],  # (tests) make the loss NaN at these checks
    "debug_nan_grad_at": [],  # (tests) make a gradient NaN at these checks
}

DESCRIPTION = "Train a derived arch, one of our vision Mamba models, or any timm model from scratch."


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


def _is_zoo_model(name: str, where: str = "", todo: str = "see timm.list_models() or pass --arch arch.yaml") -> bool:
    """Whether ``name`` is one of our timm entry points (they take ``img_size``, ``shuffle_max``...); ``where`` and
    ``todo`` frame the error for an unknown name."""
    import supernet  # noqa: F401  (registers our models with timm)

    if not timm.is_model(name):
        near = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise ValueError(f"{where}unknown model '{name}'; {hint}{todo}")
    return timm.models.model_entrypoint(name).__module__.split(".")[0] == "supernet"


def model_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Build a model from the plain-dict spec stored in checkpoints (``name``, ``kwargs``, optional ``arch``)."""
    import supernet  # registers our models with timm

    kwargs = dict(spec.get("kwargs", {}))
    if spec.get("arch"):
        if hasattr(supernet, "create_derived"):
            return supernet.create_derived(spec["arch"], **kwargs)
        return timm.create_model(spec["name"], arch=spec["arch"], **kwargs)
    return timm.create_model(spec["name"], **kwargs)


def build_model(cfg: dict[str, Any], info: DatasetInfo) -> tuple[nn.Module, dict[str, Any]]:
    """Create the model a config asks for, fitted to the data.

    Returns:
        ``(model, spec)``; ``spec`` is a plain dict (name, kwargs, arch dict) from which :func:`model_from_spec`
        rebuilds the same model, so checkpoints are self-describing; for our models also ``resolved_kwargs``, every
        constructor argument as the model resolved it (:func:`retrain.checkpoint.resolved_model_args`).

    Raises:
        ValueError: unknown model, SLWS on a model that is not ours, an arch file that does not fit its model.
    """
    kwargs: dict[str, Any] = {"num_classes": info.num_classes, "in_chans": info.in_chans, **cfg["model_kwargs"]}
    if cfg["drop_path"] > 0:
        kwargs["drop_path_rate"] = cfg["drop_path"]
    arch_dict = None
    if cfg["arch"]:
        from search_spaces import load_arch

        arch = load_arch(cfg["arch"])
        arch_dict = arch.to_dict()
        if arch.model and cfg["model"] and cfg["model"] != arch.model:
            # Documented precedence (a base config may name a model): the arch file's model wins; say so.
            print(f"note: the arch file builds '{arch.model}'; model '{cfg['model']}' is ignored")
        name = arch.model or cfg["model"]
        if not name:
            raise ValueError(f"arch file {cfg['arch']} names no model; add 'model: <derived entry>' or pass --model")
        arch_dict["model"] = name
        todo = "fix its 'model:' line (a derived model, e.g. local_vim_tiny)"
        zoo = _is_zoo_model(name, f"arch file {cfg['arch']}: ", todo)
        if not zoo:
            raise ValueError(
                f"arch file {cfg['arch']}: '{name}' is timm's own model, which takes no arch; name a derived model of "
                f"ours in its 'model:' line (e.g. local_vim_tiny, local_vmamba_tiny)"
            )
    else:
        if not cfg["model"]:
            raise ValueError("nothing to train: pass --model NAME (ours or any timm model) or --arch arch.yaml")
        name = cfg["model"]
        zoo = _is_zoo_model(name)
    if zoo:
        kwargs["img_size"] = info.img_size
        if cfg["patch_size"]:
            kwargs["patch_size"] = cfg["patch_size"]
        if cfg["shuffle_max"] > 0:
            kwargs["shuffle_max"] = cfg["shuffle_max"]
    elif cfg["shuffle_max"] > 0:
        raise ValueError(f"--shuffle-max {cfg['shuffle_max']} needs one of our Mamba models; '{name}' is timm's")
    else:
        # timm models differ in what they accept: pass the size where the constructor takes it.
        kwargs["img_size"] = info.img_size
        if cfg["patch_size"]:
            kwargs["patch_size"] = cfg["patch_size"]
    spec = {"name": name, "kwargs": kwargs, "arch": arch_dict}
    try:
        model = model_from_spec(spec)
    except TypeError as e:
        dropped = [k for k in ("img_size", "patch_size") if k in kwargs and f"'{k}'" in str(e)]
        if zoo or not dropped:
            raise ValueError(f"cannot build '{name}' with {kwargs}: {e}{unknown_kwarg_hint(name, e)}") from None
        for k in dropped:
            kwargs.pop(k)
        model = model_from_spec(spec)
    resolved = resolved_model_args(model)
    if resolved is not None:  # our models: every constructor argument as the model took it (a resume compares them)
        spec["resolved_kwargs"] = resolved
    return model, spec


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


# What a resumed run's saved state depends on: the LR schedule (its length and shape), the optimizer (its state has
# that optimizer's entries), the batch size a mid-epoch position counts in, the validation split. A resume that changes
# one is refused (and so is one whose steps per epoch differ: retrain.checkpoint.check_resume_steps).
RESUME_KEYS = (
    "epochs", "sched", "lr", "min_lr", "warmup_epochs", "warmup_lr", "opt", "weight_decay", "momentum", "batch_size",
    "val_frac", "seed", "model_ema", "model_ema_decay",
)  # fmt: skip


def check_values(cfg: dict[str, Any]) -> None:
    """Ranges the types cannot express; each error names the flag and a valid range."""
    checks = [
        ("epochs", cfg["epochs"] >= 1, ">= 1"),
        ("batch_size", cfg["batch_size"] >= 1, ">= 1"),
        ("lr", cfg["lr"] > 0, "> 0"),
        ("weight_decay", cfg["weight_decay"] >= 0, ">= 0"),
        ("warmup_epochs", cfg["warmup_epochs"] >= 0, ">= 0"),
        ("warmup_lr", cfg["warmup_lr"] >= 0, ">= 0"),
        ("min_lr", cfg["min_lr"] >= 0, ">= 0"),
        ("seed", cfg["seed"] >= 0, ">= 0"),
        ("mixup_prob", 0.0 <= cfg["mixup_prob"] <= 1.0, "in [0, 1]"),
        ("shuffle_max", 0.0 <= cfg["shuffle_max"] <= 1.0, "in [0, 1]"),
        ("drop_path", 0.0 <= cfg["drop_path"] < 1.0, "in [0, 1)"),
        ("smoothing", 0.0 <= cfg["smoothing"] < 1.0, "in [0, 1)"),
        ("mixup", cfg["mixup"] >= 0, ">= 0"),
        ("cutmix", cfg["cutmix"] >= 0, ">= 0"),
        ("model_ema_decay", 0.0 < cfg["model_ema_decay"] < 1.0, "in (0, 1)"),
        ("clip_grad", cfg["clip_grad"] >= 0, ">= 0 (0 = off)"),
        ("checkpoint_hist", cfg["checkpoint_hist"] >= 0, ">= 0"),
        ("workers", cfg["workers"] >= 0, ">= 0"),
        ("log_interval", cfg["log_interval"] >= 1, ">= 1"),
        ("checkpoint_interval", cfg["checkpoint_interval"] >= 0, ">= 0 (0 = at epoch ends only)"),
        ("rollback_after", cfg["rollback_after"] >= 0, ">= 0 (0 = never)"),
        ("max_bad_steps", cfg["max_bad_steps"] >= 1, ">= 1"),
        ("dist_timeout", cfg["dist_timeout"] > 0, "> 0"),
        ("eval_metric", cfg["eval_metric"] in ("top1", "top5", "loss"), "one of top1, top5, loss"),
        ("val_frac", 0.0 <= cfg["val_frac"] < 1.0, "in [0, 1) (0 = validate on the test split)"),
        ("compile", cfg["compile"] in COMPILE_MODES, "among " + ", ".join(repr(m) for m in COMPILE_MODES)),
        ("scan_sums", cfg["scan_sums"] in CHANNEL_SUMS, "among " + ", ".join(repr(m) for m in CHANNEL_SUMS)),
    ]
    check_trainer_values(cfg)
    for key, ok, want in checks:
        if not ok:
            use = want if want.startswith("one of") else f"a value {want}"
            raise ValueError(f"--{key.replace('_', '-')} {cfg[key]!r} is out of range; use {use}")
    for key in ("debug_nan_loss_at", "debug_nan_grad_at"):
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in cfg[key]):
            raise ValueError(f"--{key.replace('_', '-')} {cfg[key]!r} must list integers >= 0")
    check_model_kwargs(cfg["model_kwargs"], MODEL_ARGS_SET_BY_FLAGS)
    if (cfg["mixup"] > 0 or cfg["cutmix"] > 0) and cfg["batch_size"] % 2:
        raise ValueError(f"mixup/cutmix need an even --batch-size, got {cfg['batch_size']}")


def _experiment_name(cfg: dict[str, Any]) -> str:
    base = Path(cfg["arch"]).stem if cfg["arch"] else cfg["model"]
    return f"{base}-{cfg['dataset']}-s{cfg['seed']}"


def build_splits(
    cfg: dict[str, Any], train: bool = True
) -> tuple[Dataset | None, Dataset, Dataset | None, DatasetInfo]:
    """The datasets of a run: ``(train, val, test, info)``.

    With ``val_frac`` 0, ``val`` is the dataset's test split and ``test`` is None. With ``val_frac`` F > 0, ``val`` is
    a seeded fraction F of the train split (``split_train`` with the run's seed, built without augmentation), ``train``
    is the rest (augmented) and ``test`` is the test split. The split is a pure function of ``seed`` and ``val_frac``.
    ``train`` is None when ``train`` is False (evaluation only).
    """
    kw = {"seed": cfg["seed"], "download": cfg["download"]}
    args = (cfg["dataset"], cfg["data_dir"], "train", cfg["img_size"], cfg["in_chans"] or None)
    train_ds, info = None, None
    if train:
        train_ds, info = build_dataset(*args, num_samples=cfg["num_samples"], **kw)
    test_ds, test_info = build_dataset(*args[:2], "val", *args[3:], num_samples=cfg["num_samples"] // 4, **kw)
    info = info or test_info
    if cfg["val_frac"] <= 0:
        return train_ds, test_ds, None, info
    plain, _ = build_dataset(*args, num_samples=cfg["num_samples"], augment=False, **kw)
    try:
        held, rest = split_train(plain, cfg["val_frac"], cfg["seed"])
    except ValueError as e:
        raise ValueError(f"--val-frac {cfg['val_frac']}: {e}") from None
    return (Subset(train_ds, rest.indices) if train_ds is not None else None), held, test_ds, info


# What --eval-only takes from the command line; everything else comes from the checkpoint.
_EVAL_ONLY_KEYS = ("eval_only", "data_dir", "batch_size", "workers", "device", "debug")


def _eval_only(cfg: dict[str, Any], given: set[str] | frozenset[str]) -> dict[str, Any]:
    """Rebuild the model and data of a checkpoint, evaluate the weights its metric came from, and print (``given``:
    the settings the caller set, each named as ignored unless evaluation uses it).

    The data is the checkpoint's validation set: its ``val_frac`` and ``seed`` rebuild the same held-out split.
    """
    dinfo = init_distributed(cfg["device"])
    state = load_checkpoint(cfg["eval_only"], expect_kind="retrain")
    ignored = [f"--{k.replace('_', '-')} {cfg[k]}" for k in DEFAULTS if k in given and k not in _EVAL_ONLY_KEYS]
    if ignored and dinfo.is_main:
        print(f"note: --eval-only rebuilds the checkpoint's own model and data; ignored: {', '.join(ignored)}")
    saved_cfg = {**DEFAULTS, **{k: v for k, v in state["config"].items() if k in DEFAULTS}}
    saved_cfg.update(data_dir=cfg["data_dir"] or saved_cfg["data_dir"], download=False)
    _, val_ds, _, _ = build_splits(saved_cfg, train=False)
    loader = build_loader(val_ds, cfg["batch_size"], train=False, seed=0, num_workers=cfg["workers"], distributed=True)
    model = model_from_spec(state["model_spec"])
    weights = state["state_dict_ema"] if state.get("metric_source") == "ema" else state["state_dict"]
    model.load_state_dict(weights)
    model.to(dinfo.device)
    metrics = evaluate(model, loader, dinfo.device, amp_dtype_for(dinfo.device, saved_cfg["amp"]))
    saved = state.get("metrics", {})
    out = {**metrics, "checkpoint": str(cfg["eval_only"]), "epoch": state["epoch"], "saved": saved}
    if dinfo.is_main:
        frac = float(saved_cfg["val_frac"])
        split = f"held-out {frac:g} of train, seed {saved_cfg['seed']}" if frac > 0 else "the test split"
        print(f"eval {cfg['eval_only']} (epoch {state['epoch']}, {split}): {format_metrics(metrics)}", flush=True)
    return out


def _final_test(
    net: nn.Module, ema: ModelEmaV3 | None, test_ds: Dataset, cfg: dict[str, Any], dinfo: Any, amp_dtype: Any
) -> dict[str, float]:
    """The one look at the test split of a held-out-validation run: ``test_*`` (and ``ema_test_*``) metrics."""
    loader = build_loader(test_ds, cfg["batch_size"], False, cfg["seed"], cfg["workers"], dinfo.distributed)
    out = {f"test_{k}": v for k, v in evaluate(net, loader, dinfo.device, amp_dtype).items()}
    if ema is not None:
        out.update({f"ema_test_{k}": v for k, v in evaluate(ema.module, loader, dinfo.device, amp_dtype).items()})
    return out


def _write_test_json(run_dir: Path, cfg: dict[str, Any], test: dict[str, float]) -> None:
    """The final test's metrics as ``test.json`` (main rank), with the recipe's identifiers."""
    test_file = {"epoch": cfg["epochs"] - 1, "val_frac": cfg["val_frac"], "seed": cfg["seed"], **test}
    (run_dir / "test.json").write_text(json.dumps(test_file, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


def main(cfg: dict[str, Any], on_epoch: Callable[[int, dict[str, Any], Path], None] | None = None) -> dict[str, Any]:
    """Train (or, with ``eval_only``, evaluate) as ``cfg`` says.

    Args:
        cfg: a config; missing keys take :data:`DEFAULTS`, unknown keys and wrong types raise ConfigError.
        on_epoch: called on the main rank after each epoch's checkpoint as ``on_epoch(epoch, metrics, path)``
            (e.g. a Ray Tune trainable reporting ``metrics`` with the checkpoint at ``path``).

    Returns:
        ``run_dir``, ``model``, ``params``, ``flops``, ``train_img_s`` (all ranks), the final epoch's metrics
        (``top1``, ``top5``, ``loss``, and ``ema_*`` with EMA), ``best_metric`` / ``best_epoch``, ``epochs_run``,
        ``interrupted``; with ``val_frac`` (and not interrupted) also the final model's ``test_top1``,
        ``test_top5``, ``test_loss`` (``ema_test_*`` with EMA) on the test split. With ``eval_only``: the
        checkpoint's metrics now (on its validation set) and as saved.
    """
    given = given_settings()
    given = set(cfg) if given is None else given  # from Python: the keys of its dict
    cfg = resolve_config(DEFAULTS, overrides=cfg)
    if cfg["eval_only"]:
        return _eval_only(cfg, given)
    check_values(cfg)
    set_channel_sums(cfg["scan_sums"])  # process-wide, before any scan runs
    dinfo = init_distributed(cfg["device"], cfg["dist_timeout"])
    device, amp_dtype = dinfo.device, amp_dtype_for(dinfo.device, cfg["amp"])
    run_dir = Path(cfg["output"]) / (cfg["experiment"] or _experiment_name(cfg))
    resume_path = resolve_resume(cfg["resume"], run_dir, verbose=dinfo.is_main)
    refuse_existing_run(run_dir, cfg["resume"], resume_path)

    # Data, then the model (seeded identically on every rank; DDP also broadcasts rank 0's weights).
    seed_everything(cfg["seed"])
    train_ds, val_ds, test_ds, info = build_splits(cfg)
    assert train_ds is not None
    loader = build_loader(train_ds, cfg["batch_size"], True, cfg["seed"], cfg["workers"], dinfo.distributed)
    val_loader = build_loader(val_ds, cfg["batch_size"], False, cfg["seed"], cfg["workers"], dinfo.distributed)
    model, spec = build_model(cfg, info)
    model.to(device)
    params, flops = count_params_flops(model, info.img_size, info.in_chans)

    optimizer = create_optimizer_v2(
        model, opt=cfg["opt"], lr=cfg["lr"], weight_decay=cfg["weight_decay"], momentum=cfg["momentum"]
    )
    updates_per_epoch = len(loader)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg["sched"],
        num_epochs=cfg["epochs"],
        warmup_epochs=cfg["warmup_epochs"],
        warmup_lr=cfg["warmup_lr"],
        min_lr=cfg["min_lr"],
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    mixup_fn = None
    if cfg["mixup"] > 0 or cfg["cutmix"] > 0:
        mixup_fn = Mixup(
            mixup_alpha=cfg["mixup"],
            cutmix_alpha=cfg["cutmix"],
            prob=cfg["mixup_prob"],
            label_smoothing=cfg["smoothing"],
            num_classes=info.num_classes,
        )
        loss_fn: nn.Module = SoftTargetCrossEntropy()
    elif cfg["smoothing"] > 0:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=cfg["smoothing"])
    else:
        loss_fn = nn.CrossEntropyLoss()
    ema = ModelEmaV3(model, decay=cfg["model_ema_decay"], use_warmup=True) if cfg["model_ema"] else None
    keeper = CheckpointKeeper(run_dir, max_history=cfg["checkpoint_hist"], decreasing=cfg["eval_metric"] == "loss")

    guard = BadStepGuard(
        cfg["rollback_after"],
        cfg["max_bad_steps"],
        device,
        hint=f"run the scan in fp32 (--no-amp) or lower --lr; --resume auto continues from {run_dir / 'last.pt'}",
        poison_loss_at=cfg["debug_nan_loss_at"],
        poison_grad_at=cfg["debug_nan_grad_at"],
    )

    def result(
        final: dict[str, Any], test: dict[str, Any], img_s: float, epochs_run: int, interrupted: bool, signum: int
    ) -> dict[str, Any]:
        """What :func:`main` returns."""
        return {
            "run_dir": str(run_dir),
            "model": spec["name"],
            "params": params,
            "flops": flops,
            "train_img_s": img_s,
            **final,
            **test,
            "best_metric": keeper.best_metric,
            "best_epoch": keeper.best_epoch,
            "epochs_run": epochs_run,
            "interrupted": interrupted,
            "signal": signum,
            "bad_steps": guard.total,
            "rollbacks": guard.rollbacks,
        }

    def restore(state: dict[str, Any]) -> int:
        """Load weights, EMA, optimizer and scheduler of a checkpoint; return its step."""
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("state_dict_ema") is not None:
            ema.module.load_state_dict(state["state_dict_ema"])
        scheduler.step_update(state["step"])
        return int(state["step"])

    start_epoch, start_batch, step = 0, 0, 0
    epoch_sums: list[float] = [0.0, 0.0]  # loss sum and samples of a resumed, half-done epoch
    if resume_path is not None:
        state = load_checkpoint(resume_path, expect_kind="retrain", expect_model=spec["name"])
        check_resume_spec(state, spec, resume_path)
        check_resume_recipe(state, cfg, resume_keys(RESUME_KEYS, cfg["opt"]), resume_path)
        check_resume_steps(state, updates_per_epoch, len(train_ds), resume_path)
        restore(state)
        keeper.load_state_dict(state.get("keeper", {}))
        start_epoch, start_batch, step = state["next_epoch"], state["next_batch"], state["step"]
        guard.total, guard.rollbacks = state.get("bad_steps", 0), state.get("rollbacks", 0)
        if start_batch > 0:
            epoch_sums = list(state.get("epoch_sums", epoch_sums))
        rngs = state["rng"]
        if len(rngs) == dinfo.world_size:
            set_rng_state(rngs[dinfo.rank])
        else:
            print_rank0(f"resume: {len(rngs)} ranks saved RNG, {dinfo.world_size} now; reseeding")
            seed_everything(cfg["seed"] + 7919 * start_epoch + dinfo.rank)
        if start_epoch >= cfg["epochs"]:
            # Nothing is trained or rewritten: the run's files stay those of the run that finished, except a held-out-
            # validation run's test.json when its final test never completed (killed during it): that test runs now.
            finished = f"{resume_path.parent} already finished (epoch {cfg['epochs']} of {cfg['epochs']}, step {step})"
            test_json, saved_test = run_dir / "test.json", {}
            if test_json.is_file():  # a held-out-validation run's final test, as it was written
                saved_test = {k: v for k, v in json.loads(test_json.read_text()).items() if "test_" in k}
            if test_ds is not None and not test_json.is_file():
                print_rank0(f"{finished} but has no test.json (its final test did not complete): testing it now")
                saved_test = _final_test(model, ema, test_ds, cfg, dinfo, amp_dtype)
                if dinfo.is_main:
                    _write_test_json(run_dir, cfg, saved_test)
                    print_rank0(f"final test ({len(test_ds)} images): {format_metrics(saved_test)}")
            else:
                print_rank0(f"{finished}; nothing to train: start a new --experiment to train again")
            done = dict(state.get("metrics") or {})
            return result(done, saved_test, float(done.get("img_s", 0.0)), 0, False, 0)
        print_rank0(f"resumed {resume_path} at epoch {start_epoch}, batch {start_batch}, step {step}")
    else:
        seed_everything(cfg["seed"] + dinfo.rank)  # augmentation, mixup and SLWS streams differ per rank
    scheduler.step_update(step)
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if dinfo.distributed else model
    if cfg["compile"]:  # checkpoints keep using `model` (no _orig_mod. prefixes); eval compiles its own graph once
        from supernet import compile_model

        net = compile_model(net, cfg["compile"])  # our models: Inductor without its layout optimization

    logger = RunLogger(run_dir, dinfo.is_main)
    if dinfo.is_main:
        save_config(cfg, run_dir / "args.yaml")
        logger.truncate_rows(start_epoch)
        logger.line(
            f"{spec['name']}: {params / 1e6:.3f}M params, {flops / 1e6:.2f} MFLOPs at {info.img_size}px; "
            f"{cfg['dataset']} {len(train_ds)} train / {len(val_ds)} val"
            + (f" (held out of train) / {len(test_ds)} test" if test_ds is not None else "")
            + f", {info.num_classes} classes; "
            f"{dinfo.world_size} x {device.type}; {run_dir}"
        )

    def make_state(epoch: int, next_epoch: int, next_batch: int, metrics: dict[str, float]) -> dict[str, Any]:
        """Everything a resumed run needs; plain tensors and containers only (weights_only loading)."""
        return {
            "kind": "retrain",
            "model": spec["name"],
            "model_spec": spec,
            "state_dict": unwrap_model(model).state_dict(),  # timm's keys: timm.create_model(checkpoint_path=) loads it
            "state_dict_ema": ema.module.state_dict() if ema is not None else None,
            "metric_source": "ema" if ema is not None else "model",
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "next_epoch": next_epoch,
            "next_batch": next_batch,
            "step": step,
            "steps_per_epoch": updates_per_epoch,  # what step, next_batch and the LR schedule count in
            "train_size": len(train_ds),
            "rng": gather_rng_states(),
            "epoch_sums": [float(loss_sum.item()), float(seen)],
            "bad_steps": guard.total,
            "rollbacks": guard.rollbacks,
            "metrics": metrics,
            "config": dict(cfg),
        }

    def save_last(epoch: int, next_batch: int) -> None:
        """``last.pt`` mid-epoch (a signal or ``checkpoint_interval``); a collective, every rank calls it."""
        state = make_state(epoch, epoch, next_batch, {})
        if dinfo.is_main:
            save_checkpoint({**state, "keeper": keeper.state_dict()}, run_dir / "last.pt")

    def roll_back() -> int:
        """Back to the weights of ``last.pt`` (the data moves on, skipping the batches in between); the new step."""
        last = run_dir / "last.pt"
        if not last.is_file():
            print_rank0(f"step {step}: {cfg['rollback_after']} bad steps in a row but no checkpoint yet; skipping on")
            return step
        back = restore(load_checkpoint(last, expect_kind="retrain", expect_model=spec["name"]))
        print_rank0(f"step {step}: {cfg['rollback_after']} bad steps in a row; rolled back to step {back} of {last}")
        logger.scalar("train/rollbacks", guard.rollbacks, back)
        return back

    final: dict[str, Any] = dict(state["metrics"]) if resume_path is not None else {}
    img_s, interrupted, epochs_run = 0.0, False, 0
    interval = cfg["checkpoint_interval"]
    with StopFlag() as stop:
        for epoch in range(start_epoch, cfg["epochs"]):
            loader.sampler.set_epoch(epoch, start=start_batch * cfg["batch_size"])
            net.train()
            loss_sum, seen = torch.tensor(epoch_sums[0], device=device), int(epoch_sums[1])
            t_epoch, seen_before = time.perf_counter(), seen  # a resumed epoch's earlier images took no time here
            for batch_idx, (images, targets) in enumerate(loader, start=start_batch):
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                if mixup_fn is not None:
                    images, targets = mixup_fn(images, targets)
                with autocast(device, amp_dtype):
                    output = net(images)
                loss = guard.poison(loss_fn(output.float(), targets))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # on every rank, even for a bad loss: DDP's gradient all-reduce needs all of them

                # One small all-reduce agrees on "skip this step" (non-finite loss or gradient) and "stop".
                verdict, stop_any = guard.check(loss, model.parameters(), step, stop.signum != 0)
                if verdict == "ok":
                    if cfg["clip_grad"] > 0:
                        nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad"])
                    optimizer.step()
                    step += 1
                    if ema is not None:
                        ema.update(model, step=step)
                    scheduler.step_update(step)
                    loss_sum += loss.detach() * images.shape[0]
                    seen += images.shape[0]
                    if step % cfg["log_interval"] == 0:
                        lr = optimizer.param_groups[0]["lr"]
                        logger.scalar("train/loss", loss.item(), step)
                        logger.scalar("train/lr", lr, step)
                        logger.line(
                            f"epoch {epoch} [{batch_idx + 1}/{updates_per_epoch}] step {step} loss {loss.item():.4f} "
                            f"lr {lr:.3g}"
                        )
                else:
                    logger.scalar("train/bad_steps", guard.total, step)
                    if verdict == "rollback":
                        step = roll_back()
                if stop_any:  # a signal: save where we are and return
                    save_last(epoch, batch_idx + 1)
                    print_rank0(f"stopped by signal {stop.signum} at step {step}; --resume auto continues")
                    interrupted = True
                    break
                if verdict == "ok" and interval and step % interval == 0:
                    save_last(epoch, batch_idx + 1)
            if interrupted:
                break
            start_batch, epoch_sums = 0, [0.0, 0.0]
            epoch_time = time.perf_counter() - t_epoch
            img_s = (seen - seen_before) * dinfo.world_size / max(epoch_time, 1e-9)
            train_loss = float(loss_sum.item()) / max(seen, 1)

            val = evaluate(net, val_loader, device, amp_dtype)
            metrics = {"train_loss": train_loss, **val, "lr": optimizer.param_groups[0]["lr"], "img_s": img_s}
            source = val
            if ema is not None:
                ema_val = evaluate(ema.module, val_loader, device, amp_dtype)
                metrics.update({f"ema_{k}": v for k, v in ema_val.items()})
                source = ema_val
            metric = source[cfg["eval_metric"]]
            state = make_state(epoch, epoch + 1, 0, metrics)  # collective: every rank builds it
            ckpt_path = run_dir / "last.pt"
            if dinfo.is_main:
                # The row first: a kill between the two leaves a row that the resumed run truncates and rewrites.
                logger.row(epoch, metrics)
                written = keeper.save(state, epoch, metric)
                ckpt_path = written["last"]
                for k, v in metrics.items():
                    logger.scalar(f"epoch/{k}", v, epoch)
                logger.scalar("epoch/bad_steps", guard.total, epoch)
                logger.scalar("epoch/rollbacks", guard.rollbacks, epoch)
                logger.line(f"epoch {epoch}: {format_metrics(metrics)}" + ("  *best" if "best" in written else ""))
                logger.flush()
                if on_epoch is not None:
                    on_epoch(epoch, metrics, ckpt_path)
            if dinfo.distributed:
                dist.barrier()
            final = metrics
            epochs_run += 1
        test = {}
        if test_ds is not None and not interrupted:
            test = _final_test(net, ema, test_ds, cfg, dinfo, amp_dtype)
            if dinfo.is_main:
                _write_test_json(run_dir, cfg, test)
                logger.line(f"final test ({len(test_ds)} images): {format_metrics(test)}")
    logger.close()
    return result(final, test, img_s, epochs_run, interrupted, int(stop.signum) if interrupted else 0)


if __name__ == "__main__":
    sys.exit(run_cli(main, DEFAULTS, description=DESCRIPTION, helps=defaults_help(__file__)))
