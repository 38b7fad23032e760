"""Search the scan orders of every layer: a training run of a supernet with an extra architecture step.

    python -m nas.search -c configs/demo/search.yaml
    python -m nas.search --model local_vim_mini_search --dataset fashion_mnist --data-dir fashion_mnist.npz \\
        --img-size 28 --algo gdas --epochs 30
    torchrun --nproc-per-node 2 -m nas.search -c CONFIG      # DDP; arch logits are parameters, their grads averaged

The training set is split, seeded and disjoint, into a *weight set* and an *arch set* (``arch_frac`` of it). Three
algorithms, visible in :func:`main`'s loop:

* ``darts`` — first-order bilevel DARTS: an arch step (Adam on ``arch_parameters()`` only) on an arch batch, then a
  weight step (timm's optimizer on ``weight_parameters()`` only) on a weight batch; orders mixed by softmax.
* ``joint`` — LocalMamba's single level: both optimizers step on the gradient of the same weight batch.
* ``gdas`` — the darts loop with Gumbel top-``gdas_top_m`` straight-through sampling (only the sampled orders are
  computed) and a temperature annealed linearly from ``tau_max`` to ``tau_min`` (:func:`gdas_tau`).

Arch parameters have their own optimizer (DARTS defaults: Adam lr 3e-4, betas (0.5, 0.999), wd 1e-3), never get the
weights' decay, are never averaged into an EMA, and stay frozen for ``arch_warmup_epochs``. Writes under
``<output>/<experiment>/``: ``args.yaml``, ``summary.csv``, ``tb/`` (losses, accuracies, lr, every layer's
probabilities and entropy, a layers × candidates heatmap per epoch), ``arch_probs.jsonl`` (one line per epoch), and
``last.pt`` / ``best.pt`` (by arch-set top-1) holding everything needed to resume. Derive the arch with
``python -m nas.vis_search_prob RUN_DIR``.

Checkpointing, ``--resume auto``, ``--checkpoint-interval``, signals and the handling of non-finite steps are those
of ``retrain.train`` (arch steps included); every checkpoint asserts that all ranks hold the same arch logits.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Subset

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
from retrain.config import check_model_kwargs, defaults_help, resolve_config, run_cli, save_config, unknown_kwarg_hint
from retrain.data import build_dataset, build_loader, split_train
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
    git_commit,
    init_distributed,
    print_rank0,
    resume_keys,
    seed_everything,
    set_rng_state,
)

__all__ = [
    "ALGOS",
    "DEFAULTS",
    "arch_param_groups",
    "build_supernet",
    "check_values",
    "gdas_tau",
    "main",
    "weight_param_groups",
]

ALGOS = ("darts", "joint", "gdas")

DEFAULTS: dict[str, Any] = {
    # what to search
    "model": "local_vim_mini_search",  # a *_search entry point of ours
    "model_kwargs": {},  # extra constructor arguments, e.g. {embed_dim: 96} (CLI: --model-kwargs embed_dim=96)
    "space": "",  # "" = the model's own space; or a preset name / YAML file
    "patch_size": 0,  # 0 = the model's default
    "drop_path": 0.0,  # stochastic depth rate (drop_path_rate)
    # data
    "dataset": "synthetic",  # synthetic | fashion_mnist | mnist | cifar10 | cifar100 | imagefolder
    "data_dir": "",  # the dataset's folder (an .npz file for fashion_mnist/mnist also works)
    "img_size": 32,  # input size in pixels (images are resized to it)
    "in_chans": 0,  # 0 = the data's own channels
    "num_samples": 0,  # synthetic only: train size before the split (0 = 4096)
    "download": False,  # let torchvision download cifar10/cifar100 into data_dir
    "workers": 0,  # DataLoader workers (0 keeps augmentation on the main RNG: exact resume)
    "arch_frac": 0.5,  # share of the training set held out as the arch set (DARTS: 50/50)
    # search
    "algo": "darts",  # darts (first-order, alternating) | joint (LocalMamba: both on one batch) | gdas (Gumbel top-m)
    "arch_lr": 3e-4,  # Adam learning rate of the arch logits
    "arch_betas": (0.5, 0.999),  # its betas
    "arch_weight_decay": 1e-3,  # its weight decay
    "arch_warmup_epochs": 1,  # arch parameters frozen for these first epochs (weights warm up alone)
    "tau_max": 10.0,  # gdas temperature, annealed linearly per step to tau_min
    "tau_min": 0.1,  # gdas temperature at the last step
    "gdas_top_m": 1,  # orders sampled per layer and step in gdas
    # weights (timm factories)
    "epochs": 10,  # search epochs (the weights' LR schedule spans them)
    "batch_size": 64,  # images per step and process (weight and arch batches alike)
    "opt": "adamw",  # the weights' timm optimizer name: adamw, sgd, lamb, ...
    "lr": 1e-3,  # the weights' peak learning rate
    "weight_decay": 0.05,  # the weights' weight decay (norms, biases and the SSM's A, D left out)
    "momentum": 0.9,  # SGD momentum
    "sched": "cosine",  # a timm scheduler name: cosine, step, ...
    "warmup_epochs": 1,  # linear LR warm-up from warmup_lr
    "warmup_lr": 1e-5,  # LR at the start of the warm-up
    "min_lr": 1e-5,  # LR at the end of the schedule
    "clip_grad": 5.0,  # max norm of the weights' gradient (0 = off); DARTS clips at 5
    "smoothing": 0.0,  # label smoothing
    "amp": True,  # bf16 autocast on CUDA; CPU always runs fp32
    "compile": "",  # torch.compile mode for the supernet's forward ("" = eager; e.g. default, reduce-overhead)
    "scan_sums": "fixed",  # scan backward dB/dC channel sums (GPU bf16, process-wide): fixed(-point)|butterfly|packed
    "rollback_after": 5,  # non-finite steps in a row that roll back to the last checkpoint (0 = never)
    "max_bad_steps": 20,  # non-finite steps in all (each is skipped) after which the search stops
    # run
    "seed": 0,  # seeds every RNG (weights, split, data order, sampling)
    "output": "runs",  # parent folder of the run directory
    "experiment": "",  # "" = <model>-<algo>-<dataset>-s<seed>
    "resume": "",  # a checkpoint path, or "auto"
    "checkpoint_interval": 0,  # also save last.pt every this many steps (0 = at epoch ends only)
    "log_interval": 50,  # a progress line and TensorBoard scalars every this many steps
    "device": "auto",  # auto (CUDA if present) | cpu | cuda | cuda:N
    "dist_timeout": 600.0,  # seconds a rank waits for the others before the run stops (a rank died)
    "debug": False,  # show tracebacks instead of one-line errors
    # test hooks: NaN loss / gradient at these checks (0-based; arch and weight steps both count)
    "debug_nan_loss_at": [],  # (tests) make the loss NaN at these checks
    "debug_nan_grad_at": [],  # (tests) make a gradient NaN at these checks
}

# Constructor arguments the search sets from its flags or the data ("": the data), refused in model_kwargs.
MODEL_ARGS_SET_BY_FLAGS = {**TRAINER_MODEL_ARGS, "space": "--space"}

DESCRIPTION = "Search per-layer scan orders of a vision Mamba supernet (DARTS, LocalMamba joint, or GDAS)."


# --------------------------------------------------------------------------------------------------------------------
# Pure pieces (unit-tested)
# --------------------------------------------------------------------------------------------------------------------


def gdas_tau(step: int, total_steps: int, tau_max: float, tau_min: float) -> float:
    """GDAS temperature at ``step``: linear from ``tau_max`` (step 0) to ``tau_min`` (the last step), then flat."""
    if total_steps <= 1:
        return float(tau_min)
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    return float(tau_max - (tau_max - tau_min) * frac)


def arch_active(epoch: int, arch_warmup_epochs: int) -> bool:
    """Whether the arch parameters are updated in ``epoch`` (frozen during the warm-up epochs)."""
    return epoch >= arch_warmup_epochs


def weight_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """timm-style decay / no-decay groups over ``model.weight_parameters()`` only (no arch parameter anywhere)."""
    weights = {id(p) for p in model.weight_parameters()}
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if id(p) not in weights or not p.requires_grad:
            continue
        # 1-D tensors (norms, biases) and the model's named exceptions get no decay, as timm's factory does.
        (no_decay if p.ndim <= 1 or name in skip or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def arch_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The arch optimizer's one group: every ``arch_logits``."""
    return [{"params": list(model.arch_parameters())}]


def entropy(p: torch.Tensor) -> float:
    """Entropy (nats) of a probability vector."""
    p = p.clamp_min(1e-12)
    return float(-(p * p.log()).sum())


def probs_heatmap(probs: np.ndarray, cell: int = 12) -> np.ndarray:
    """A layers × candidates heatmap as a CHW float image in [0, 1] (viridis, each cell ``cell`` pixels)."""
    import matplotlib

    scaled = probs / max(float(probs.max()), 1e-12)
    rgb = matplotlib.colormaps["viridis"](scaled)[..., :3]  # (layers, K, 3)
    rgb = np.kron(rgb, np.ones((cell, cell, 1)))
    return rgb.transpose(2, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------------------------------


def build_supernet(cfg: dict[str, Any], num_classes: int, in_chans: int) -> tuple[nn.Module, dict[str, Any]]:
    """Create the supernet and the plain-dict spec (``name``, ``kwargs``) that rebuilds it, with the constructor
    arguments as the model resolved them (``resolved_kwargs``, see :func:`retrain.checkpoint.resolved_model_args`).

    Raises:
        ValueError: unknown model, or a model without arch parameters.
    """
    import supernet  # noqa: F401  (registers our models with timm)

    name = cfg["model"]
    if not timm.is_model(name):
        searchable = [m for m in supernet.list_models() if m.endswith("_search")]
        raise ValueError(f"unknown model '{name}'; search models: {', '.join(searchable)}")
    kwargs: dict[str, Any] = {
        "num_classes": num_classes,
        "in_chans": in_chans,
        "img_size": cfg["img_size"],
        **cfg["model_kwargs"],
    }
    if cfg["patch_size"]:
        kwargs["patch_size"] = cfg["patch_size"]
    if cfg["space"]:
        kwargs["space"] = cfg["space"]
    if cfg["drop_path"] > 0:
        kwargs["drop_path_rate"] = cfg["drop_path"]
    try:
        model = timm.create_model(name, **kwargs)
    except TypeError as e:  # an argument the model does not take (--model-kwargs d_stat=4)
        raise ValueError(f"cannot build '{name}' with {kwargs}: {e}{unknown_kwarg_hint(name, e)}") from None
    if not hasattr(model, "arch_parameters") or not list(model.arch_parameters()):
        raise ValueError(
            f"'{name}' has no arch parameters; search a supernet (a *_search model, e.g. {DEFAULTS['model']})"
        )
    k = min(p.numel() for p in model.arch_parameters())
    if cfg["algo"] == "gdas" and cfg["gdas_top_m"] > k:
        raise ValueError(f"--gdas-top-m {cfg['gdas_top_m']} is out of range; the space has {k} candidates per layer")
    spec: dict[str, Any] = {"name": name, "kwargs": kwargs}
    resolved = resolved_model_args(model)
    if resolved is not None:  # every constructor argument as the model took it (a resume compares them)
        spec["resolved_kwargs"] = resolved
    return model, spec


def supernet_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a supernet from the spec stored in a search checkpoint (weights not loaded)."""
    import supernet  # noqa: F401

    return timm.create_model(spec["name"], **spec["kwargs"])


class _BatchStream:
    """Endless batches of a loader (the arch set), whose position (pass, batch) is saved and restored."""

    def __init__(self, loader, batch_size: int) -> None:
        self.loader, self.batch_size = loader, batch_size
        self.passes, self.pos, self._it = 0, 0, None

    def __next__(self):
        if self._it is None:
            self.loader.sampler.set_epoch(self.passes, start=self.pos * self.batch_size)
            self._it = iter(self.loader)
        try:
            batch = next(self._it)
        except StopIteration:
            self.passes, self.pos = self.passes + 1, 0
            self.loader.sampler.set_epoch(self.passes)
            self._it = iter(self.loader)
            batch = next(self._it)
        self.pos += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"passes": self.passes, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.passes, self.pos, self._it = int(state["passes"]), int(state["pos"]), None


# What a resumed search's saved state depends on (see retrain.train.RESUME_KEYS), plus the weight/arch split. The arch
# optimizer is always Adam (no setting changes the kind of its state).
RESUME_KEYS = (
    "epochs", "sched", "lr", "min_lr", "warmup_epochs", "warmup_lr", "opt", "weight_decay", "momentum", "batch_size",
    "seed", "arch_frac", "algo", "arch_lr", "arch_betas", "arch_weight_decay", "arch_warmup_epochs",
)  # fmt: skip
GDAS_RESUME_KEYS = ("tau_max", "tau_min", "gdas_top_m")  # the temperature schedule and the sampled paths


def check_values(cfg: dict[str, Any]) -> None:
    checks = [
        ("algo", cfg["algo"] in ALGOS, f"one of {', '.join(ALGOS)}"),
        ("epochs", cfg["epochs"] >= 1, ">= 1"),
        ("batch_size", cfg["batch_size"] >= 1, ">= 1"),
        ("lr", cfg["lr"] > 0, "> 0"),
        ("arch_lr", cfg["arch_lr"] > 0, "> 0"),
        (
            "arch_betas",
            len(cfg["arch_betas"]) == 2 and all(0 <= b < 1 for b in cfg["arch_betas"]),
            "two numbers in [0, 1)",
        ),
        ("arch_weight_decay", cfg["arch_weight_decay"] >= 0, ">= 0"),
        (
            "arch_warmup_epochs",
            0 <= cfg["arch_warmup_epochs"] < cfg["epochs"],
            f">= 0 and below --epochs {cfg['epochs']} (the arch is frozen for these epochs: with none left it would "
            f"never leave its initial values)",
        ),
        ("arch_frac", 0.0 < cfg["arch_frac"] < 1.0, "in (0, 1)"),
        ("tau_max", cfg["tau_max"] > 0, "> 0"),
        ("tau_min", 0 < cfg["tau_min"] <= cfg["tau_max"], "in (0, tau_max]"),
        ("gdas_top_m", cfg["gdas_top_m"] >= 1, ">= 1"),
        ("weight_decay", cfg["weight_decay"] >= 0, ">= 0"),
        ("warmup_epochs", cfg["warmup_epochs"] >= 0, ">= 0"),
        ("warmup_lr", cfg["warmup_lr"] >= 0, ">= 0"),
        ("min_lr", cfg["min_lr"] >= 0, ">= 0"),
        ("seed", cfg["seed"] >= 0, ">= 0"),
        ("clip_grad", cfg["clip_grad"] >= 0, ">= 0 (0 = off)"),
        ("smoothing", 0.0 <= cfg["smoothing"] < 1.0, "in [0, 1)"),
        ("log_interval", cfg["log_interval"] >= 1, ">= 1"),
        ("workers", cfg["workers"] >= 0, ">= 0"),
        ("checkpoint_interval", cfg["checkpoint_interval"] >= 0, ">= 0 (0 = at epoch ends only)"),
        ("rollback_after", cfg["rollback_after"] >= 0, ">= 0 (0 = never)"),
        ("max_bad_steps", cfg["max_bad_steps"] >= 1, ">= 1"),
        ("dist_timeout", cfg["dist_timeout"] > 0, "> 0"),
        ("compile", cfg["compile"] in COMPILE_MODES, "a value among " + ", ".join(repr(m) for m in COMPILE_MODES)),
        ("scan_sums", cfg["scan_sums"] in CHANNEL_SUMS, "a value among " + ", ".join(repr(m) for m in CHANNEL_SUMS)),
    ]
    check_trainer_values(cfg)
    for key, ok, want in checks:
        if not ok:
            raise ValueError(f"--{key.replace('_', '-')} {cfg[key]!r} is out of range; use {want}")
    check_model_kwargs(cfg["model_kwargs"], MODEL_ARGS_SET_BY_FLAGS)
    for key in ("debug_nan_loss_at", "debug_nan_grad_at"):
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in cfg[key]):
            raise ValueError(f"--{key.replace('_', '-')} {cfg[key]!r} must list integers >= 0")


def _check_logits_identical(model: nn.Module) -> None:
    """Under DDP, assert every rank holds bit-identical arch logits (a derived arch must not depend on the rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.arch_parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = torch.tensor([float((flat != ref).any())], device=flat.device)
    dist.all_reduce(diff)
    if diff.item() > 0:
        raise RuntimeError("arch logits differ across ranks; the search is not consistent (report this as a bug)")


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _truncate_jsonl(path: Path, from_epoch: int) -> None:
    """Keep the records of the epochs before ``from_epoch`` (a resumed run writes the rest again). A line that is not
    a record (a write torn by a kill) is dropped with a warning rather than stopping the resume."""
    if not path.exists():
        return
    lines = []
    for i, ln in enumerate(path.read_text().splitlines()):
        if not ln.strip():
            continue
        try:
            epoch = json.loads(ln)["epoch"]
            keep = int(epoch) < from_epoch
        except (ValueError, TypeError, KeyError):
            warnings.warn(f"{path}: line {i + 1} is not an epoch record (a torn write?); dropped", stacklevel=2)
            continue
        if keep:
            lines.append(ln)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------------------------


def main(cfg: dict[str, Any], on_epoch: Callable[[int, dict[str, Any], Path], None] | None = None) -> dict[str, Any]:
    """Run a search as ``cfg`` says.

    Args:
        cfg: a config; missing keys take :data:`DEFAULTS`, unknown keys and wrong types raise ConfigError.
        on_epoch: called on the main rank after each epoch's checkpoint as ``on_epoch(epoch, metrics, path)``.

    Returns:
        ``run_dir``, ``model``, ``algo``, ``params``, ``flops``, ``history`` (per-epoch metrics incl. ``arch_top1``,
        the arch-set accuracy), the final epoch's metrics, ``best_arch_top1`` / ``best_epoch``, ``labels``,
        ``candidates``, ``arch_probs`` / ``arch_logits`` (label → list), ``derived_model_name``, ``checkpoint``
        (last.pt), ``epochs_run``, ``interrupted``.
    """
    cfg = resolve_config(DEFAULTS, overrides=cfg)
    check_values(cfg)
    set_channel_sums(cfg["scan_sums"])  # process-wide, before any scan runs
    dinfo = init_distributed(cfg["device"], cfg["dist_timeout"])
    device, amp_dtype = dinfo.device, amp_dtype_for(dinfo.device, cfg["amp"])
    experiment = cfg["experiment"] or f"{cfg['model']}-{cfg['algo']}-{cfg['dataset']}-s{cfg['seed']}"
    run_dir = Path(cfg["output"]) / experiment
    resume_path = resolve_resume(cfg["resume"], run_dir, verbose=dinfo.is_main)
    refuse_existing_run(run_dir, cfg["resume"], resume_path)

    # Data: one training set, split into a weight set and an arch set (seeded, disjoint, the same on every rank).
    seed_everything(cfg["seed"])
    data_kw = {"seed": cfg["seed"], "download": cfg["download"], "num_samples": cfg["num_samples"]}
    train_ds, info = build_dataset(
        cfg["dataset"], cfg["data_dir"], "train", cfg["img_size"], cfg["in_chans"] or None, **data_kw
    )
    arch_set, weight_set = split_train(train_ds, cfg["arch_frac"], seed=cfg["seed"])
    plain_ds, _ = build_dataset(
        cfg["dataset"], cfg["data_dir"], "train", cfg["img_size"], cfg["in_chans"] or None, augment=False, **data_kw
    )
    arch_eval_set = Subset(plain_ds, arch_set.indices)  # the arch set without augmentation, for its accuracy
    bs, workers = cfg["batch_size"], cfg["workers"]
    loader = build_loader(weight_set, bs, True, cfg["seed"], workers, dinfo.distributed)
    arch_loader = build_loader(arch_set, bs, True, cfg["seed"] + 1, workers, dinfo.distributed)
    arch_eval_loader = build_loader(arch_eval_set, bs, False, cfg["seed"], workers, dinfo.distributed)
    arch_stream = _BatchStream(arch_loader, bs)

    model, spec = build_supernet(cfg, info.num_classes, info.in_chans)
    model.to(device)
    params, flops = count_params_flops(model, info.img_size, info.in_chans)
    labels = list(model.arch_labels())
    candidates = list(model.search_space.candidates)
    derived_name = model.derived_model_name
    commit = git_commit()

    # Two optimizers over a partition of the parameters: timm's for the weights, Adam for the arch logits.
    optimizer = create_optimizer_v2(
        weight_param_groups(model, cfg["weight_decay"]),
        opt=cfg["opt"],
        lr=cfg["lr"],
        weight_decay=cfg["weight_decay"],
        momentum=cfg["momentum"],
    )
    arch_optimizer = torch.optim.Adam(
        arch_param_groups(model),
        lr=cfg["arch_lr"],
        betas=tuple(cfg["arch_betas"]),
        weight_decay=cfg["arch_weight_decay"],
    )
    updates_per_epoch = len(loader)
    total_steps = updates_per_epoch * cfg["epochs"]
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
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg["smoothing"])
    keeper = CheckpointKeeper(run_dir, max_history=0)

    guard = BadStepGuard(
        cfg["rollback_after"],
        cfg["max_bad_steps"],
        device,
        hint=f"run the scan in fp32 (--no-amp) or lower --lr / --arch-lr; --resume auto continues from "
        f"{run_dir / 'last.pt'}",
        poison_loss_at=cfg["debug_nan_loss_at"],
        poison_grad_at=cfg["debug_nan_grad_at"],
    )

    def result(
        history: list[dict[str, Any]], final: dict[str, Any], epochs_run: int, interrupted: bool, signum: int
    ) -> dict[str, Any]:
        """What :func:`main` returns."""
        probs = model.arch_probs()
        return {
            "run_dir": str(run_dir),
            "model": spec["name"],
            "algo": cfg["algo"],
            "params": params,
            "flops": flops,
            "history": history,
            **final,
            "best_arch_top1": keeper.best_metric,
            "best_epoch": keeper.best_epoch,
            "labels": labels,
            "candidates": candidates,
            "arch_probs": {label: probs[label].tolist() for label in labels},
            "arch_logits": {label: p.detach().cpu().tolist() for label, p in zip(labels, model.arch_parameters())},
            "derived_model_name": derived_name,
            "checkpoint": str(run_dir / "last.pt"),
            "epochs_run": epochs_run,
            "interrupted": interrupted,
            "signal": signum,
            "bad_steps": guard.total,
            "rollbacks": guard.rollbacks,
        }

    def restore(state: dict[str, Any]) -> int:
        """Load weights, arch logits, both optimizers and the scheduler of a checkpoint; return its step."""
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        arch_optimizer.load_state_dict(state["arch_optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scheduler.step_update(state["step"])
        return int(state["step"])

    start_epoch, start_batch, step = 0, 0, 0
    epoch_sums: list[float] = [0.0] * 5  # the sums and samples of a resumed, half-done epoch
    history: list[dict[str, Any]] = []
    if resume_path is not None:
        state = load_checkpoint(resume_path, expect_kind="search", expect_model=spec["name"])
        check_resume_spec(state, spec, resume_path)
        keys = resume_keys(RESUME_KEYS + (GDAS_RESUME_KEYS if cfg["algo"] == "gdas" else ()), cfg["opt"])
        check_resume_recipe(state, cfg, keys, resume_path)
        check_resume_steps(state, updates_per_epoch, len(weight_set), resume_path, "weight-set images")
        restore(state)
        keeper.load_state_dict(state.get("keeper", {}))
        arch_stream.load_state_dict(state["arch_stream"])
        start_epoch, start_batch, step = state["next_epoch"], state["next_batch"], state["step"]
        guard.total, guard.rollbacks = state.get("bad_steps", 0), state.get("rollbacks", 0)
        if start_batch > 0:
            epoch_sums = list(state.get("epoch_sums", epoch_sums))
        history = [h for h in state.get("history", []) if h["epoch"] < start_epoch]
        rngs = state["rng"]
        if len(rngs) == dinfo.world_size:
            set_rng_state(rngs[dinfo.rank])
        else:
            print_rank0(f"resume: {len(rngs)} ranks saved RNG, {dinfo.world_size} now; reseeding")
            seed_everything(cfg["seed"] + 7919 * start_epoch + dinfo.rank)
        if start_epoch >= cfg["epochs"]:
            # Nothing is written: the run's files stay those of the search that finished.
            print_rank0(
                f"{resume_path.parent} already finished (epoch {cfg['epochs']} of {cfg['epochs']}, step {step}); "
                f"nothing to search: derive its arch with python -m nas.vis_search_prob {resume_path.parent}, or start "
                f"a new --experiment"
            )
            return result(history, dict(history[-1]) if history else {}, 0, False, 0)
        print_rank0(f"resumed {resume_path} at epoch {start_epoch}, batch {start_batch}, step {step}")
    else:
        seed_everything(cfg["seed"] + dinfo.rank)  # Gumbel, SLWS and augmentation streams differ per rank
    scheduler.step_update(step)
    mode = "hard" if cfg["algo"] == "gdas" else "softmax"
    # The temperature anneals over the steps that update the arch, i.e. from the end of the arch warm-up.
    first_arch_step = min(cfg["arch_warmup_epochs"], cfg["epochs"]) * updates_per_epoch
    anneal_steps = total_steps - first_arch_step

    def tau_at(step: int) -> float:
        return gdas_tau(step - first_arch_step, anneal_steps, cfg["tau_max"], cfg["tau_min"])

    model.set_arch_mode(mode, tau=tau_at(step), top_m=cfg["gdas_top_m"])
    # gdas leaves unsampled orders without gradients; DDP must be told to expect unused parameters then.
    net = model
    if dinfo.distributed:
        net = DDP(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=mode == "hard"
        )
    if cfg["compile"]:
        # Arch and weight steps share the training graph; evaluation runs the uncompiled model. gdas's temperature
        # changes every step: the mixers keep it in a device buffer that the graph reads, so nothing recompiles.
        # Checkpoints keep using `model`.
        from supernet import compile_model

        net = compile_model(net, cfg["compile"])  # Inductor without its layout optimization

    logger = RunLogger(run_dir, dinfo.is_main)
    probs_path = run_dir / "arch_probs.jsonl"
    if dinfo.is_main:
        save_config(cfg, run_dir / "args.yaml")
        logger.truncate_rows(start_epoch)
        _truncate_jsonl(probs_path, start_epoch)
        logger.line(
            f"{spec['name']} ({cfg['algo']}): {len(labels)} layers x {len(candidates)} orders "
            f"({', '.join(candidates)}); {params / 1e6:.3f}M params, {flops / 1e6:.2f} MFLOPs; {cfg['dataset']} "
            f"{len(weight_set)} weight / {len(arch_set)} arch images; {dinfo.world_size} x {device.type}; {run_dir}"
        )

    def make_state(epoch: int, next_epoch: int, next_batch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Everything a resumed search needs; plain tensors and containers only (weights_only loading)."""
        _check_logits_identical(model)
        return {
            "kind": "search",
            "model": spec["name"],
            "model_spec": spec,
            "model_kwargs": spec["kwargs"],
            "state_dict": model.state_dict(),  # timm's key: timm.create_model(checkpoint_path=) loads it
            "arch_logits": {label: p.detach().cpu() for label, p in zip(labels, model.arch_parameters())},
            "search_space": model.search_space.to_dict(),
            "derived_model_name": derived_name,
            "labels": labels,
            "candidates": candidates,
            "optimizer": optimizer.state_dict(),
            "arch_optimizer": arch_optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "arch_stream": arch_stream.state_dict(),
            "epoch": epoch,
            "next_epoch": next_epoch,
            "next_batch": next_batch,
            "step": step,
            "steps_per_epoch": updates_per_epoch,  # what step, next_batch and the LR schedule count in
            "train_size": len(weight_set),
            "rng": gather_rng_states(),
            "epoch_sums": [*sums.tolist(), float(seen)],
            "bad_steps": guard.total,
            "rollbacks": guard.rollbacks,
            "metrics": metrics,
            "history": history,
            "config": dict(cfg),
            "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }

    def save_last(epoch: int, next_batch: int) -> None:
        """``last.pt`` mid-epoch (a signal or ``checkpoint_interval``); a collective, every rank calls it."""
        state = make_state(epoch, epoch, next_batch, {})
        if dinfo.is_main:
            save_checkpoint({**state, "keeper": keeper.state_dict()}, run_dir / "last.pt")

    def after_bad_step(verdict: str) -> int:
        """Log the count; on ``rollback``, back to the weights and logits of ``last.pt`` (the data moves on)."""
        logger.scalar("train/bad_steps", guard.total, step)
        last = run_dir / "last.pt"
        if verdict != "rollback":
            return step
        if not last.is_file():
            print_rank0(f"step {step}: {cfg['rollback_after']} bad steps in a row but no checkpoint yet; skipping on")
            return step
        back = restore(load_checkpoint(last, expect_kind="search", expect_model=spec["name"]))
        print_rank0(f"step {step}: {cfg['rollback_after']} bad steps in a row; rolled back to step {back} of {last}")
        logger.scalar("train/rollbacks", guard.rollbacks, back)
        return back

    interrupted, epochs_run = False, 0
    interval = cfg["checkpoint_interval"]
    final: dict[str, Any] = dict(history[-1]) if history else {}
    with StopFlag() as stop:
        for epoch in range(start_epoch, cfg["epochs"]):
            loader.sampler.set_epoch(epoch, start=start_batch * bs)
            update_arch = arch_active(epoch, cfg["arch_warmup_epochs"])
            net.train()
            # weight loss, weight correct, arch loss, arch steps; then the samples seen
            sums, seen = torch.tensor(epoch_sums[:4], device=device), int(epoch_sums[4])
            t_epoch, seen_before = time.perf_counter(), seen  # a resumed epoch's earlier images took no time here
            for batch_idx, (images, targets) in enumerate(loader, start=start_batch):
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                if mode == "hard":
                    model.set_arch_mode("hard", tau=tau_at(step), top_m=cfg["gdas_top_m"])

                # Arch step (darts, gdas): a held-out arch batch moves the arch logits only.
                if update_arch and cfg["algo"] != "joint":
                    arch_images, arch_targets = next(arch_stream)
                    arch_images, arch_targets = arch_images.to(device), arch_targets.to(device)
                    arch_optimizer.zero_grad(set_to_none=True)
                    if cfg["compile"]:  # two forwards per step: tell CUDA-graph trees where a step begins
                        torch.compiler.cudagraph_mark_step_begin()
                    with autocast(device, amp_dtype):
                        arch_out = net(arch_images)
                    arch_loss = guard.poison(loss_fn(arch_out.float(), arch_targets))
                    arch_loss.backward()
                    verdict, _ = guard.check(arch_loss, model.arch_parameters(), step)
                    if verdict == "ok":
                        arch_optimizer.step()
                        sums[2] += arch_loss.detach()
                        sums[3] += 1
                    else:
                        step = after_bad_step(verdict)

                # Weight step: timm's optimizer over the weights only (joint: the arch optimizer steps here too).
                optimizer.zero_grad(set_to_none=True)
                arch_optimizer.zero_grad(set_to_none=True)
                if cfg["compile"]:
                    torch.compiler.cudagraph_mark_step_begin()
                with autocast(device, amp_dtype):
                    output = net(images)
                # Read the output before the backward: with CUDA graphs its memory may be reused after that.
                correct = (output.argmax(-1) == targets).sum()
                loss = guard.poison(loss_fn(output.float(), targets))
                loss.backward()  # on every rank, even for a bad loss: DDP's gradient all-reduce needs all of them
                # One small all-reduce agrees on "skip this step" (non-finite loss or gradient) and "stop".
                verdict, stop_any = guard.check(loss, model.parameters(), step, stop.signum != 0)
                if verdict == "ok":
                    if cfg["clip_grad"] > 0:
                        nn.utils.clip_grad_norm_(model.weight_parameters(), cfg["clip_grad"])
                    optimizer.step()
                    if update_arch and cfg["algo"] == "joint":
                        arch_optimizer.step()
                    step += 1
                    scheduler.step_update(step)
                    sums[0] += loss.detach() * images.shape[0]
                    sums[1] += correct
                    seen += images.shape[0]
                    if step % cfg["log_interval"] == 0:
                        lr = optimizer.param_groups[0]["lr"]
                        logger.scalar("train/loss", loss.item(), step)
                        logger.scalar("train/lr", lr, step)
                        if mode == "hard":
                            logger.scalar("train/tau", model.named_mixers()[0][1].tau, step)
                        logger.line(
                            f"epoch {epoch} [{batch_idx + 1}/{updates_per_epoch}] step {step} loss {loss.item():.4f} "
                            f"lr {lr:.3g}"
                        )
                else:
                    step = after_bad_step(verdict)
                if stop_any:  # a signal: save where we are and return
                    save_last(epoch, batch_idx + 1)
                    print_rank0(f"stopped by signal {stop.signum} at step {step}; --resume auto continues")
                    interrupted = True
                    break
                if verdict == "ok" and interval and step % interval == 0:
                    save_last(epoch, batch_idx + 1)
            if interrupted:
                break
            start_batch, epoch_sums = 0, [0.0] * 5
            epoch_time = time.perf_counter() - t_epoch

            # Epoch end: arch-set accuracy of the supernet (softmax mixing; gdas: its top-m orders), probabilities.
            # The uncompiled model: an inference graph between the training graph's steps broke CUDA-graph trees
            # (reduce-overhead) at the next arch step's backward.
            arch_eval = evaluate(model, arch_eval_loader, device, amp_dtype)
            probs = model.arch_probs()
            prob_rows = [probs[label].tolist() for label in labels]
            n_arch_steps = float(sums[3].item())
            metrics = {
                "train_loss": float(sums[0].item()) / max(seen, 1),
                "train_top1": 100.0 * float(sums[1].item()) / max(seen, 1),
                "arch_loss": arch_eval["loss"],
                "arch_top1": arch_eval["top1"],
                "arch_top5": arch_eval["top5"],
                # None (an empty cell, no point in TensorBoard) in an epoch without arch steps (arch warm-up)
                "arch_step_loss": float(sums[2].item()) / n_arch_steps if n_arch_steps > 0 else None,
                "lr": optimizer.param_groups[0]["lr"],
                "mean_entropy": float(np.mean([entropy(probs[label]) for label in labels])),
                "img_s": (seen - seen_before) * dinfo.world_size / max(epoch_time, 1e-9),
            }
            history.append({"epoch": epoch, **metrics})
            state = make_state(epoch, epoch + 1, 0, metrics)  # collective: every rank builds it
            ckpt_path = run_dir / "last.pt"
            if dinfo.is_main:
                # Rows first: a kill between them and the checkpoint leaves rows the resumed run truncates and rewrites.
                _append_jsonl(
                    probs_path, {"epoch": epoch, "labels": labels, "candidates": candidates, "probs": prob_rows}
                )
                logger.row(epoch, metrics)
                written = keeper.save(state, epoch, metrics["arch_top1"])
                ckpt_path = written["last"]
                for k, v in metrics.items():
                    if v is not None:
                        logger.scalar(f"epoch/{k}", v, epoch)
                logger.scalar("epoch/bad_steps", guard.total, epoch)
                logger.scalar("epoch/rollbacks", guard.rollbacks, epoch)
                for label in labels:
                    for cand, p in zip(candidates, probs[label].tolist()):
                        logger.scalar(f"probs/{label}/{cand}", p, epoch)
                    logger.scalar(f"entropy/{label}", entropy(probs[label]), epoch)
                logger.image("arch_probs", probs_heatmap(np.asarray(prob_rows)), epoch)
                logger.line(f"epoch {epoch}: {format_metrics(metrics)}" + ("  *best" if "best" in written else ""))
                logger.flush()
                if on_epoch is not None:
                    on_epoch(epoch, metrics, ckpt_path)
            if dinfo.distributed:
                dist.barrier()
            final = metrics
            epochs_run += 1
    logger.close()
    return result(history, final, epochs_run, interrupted, int(stop.signum) if interrupted else 0)


if __name__ == "__main__":
    sys.exit(run_cli(main, DEFAULTS, description=DESCRIPTION, helps=defaults_help(__file__)))
