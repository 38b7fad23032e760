"""The shared training engine: seeding, torchrun/DDP setup, AMP, evaluation, logging, RNG state, model cost.

Used by ``retrain.train`` and ``nas.search`` (and through them by the sweeps); kept free of any training-loop
policy so that each loop stays readable in one function.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import datetime
import functools
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BadStepGuard",
    "DistInfo",
    "DivergedError",
    "RunLogger",
    "StopFlag",
    "all_reduce_mean",
    "autocast",
    "amp_dtype_for",
    "count_params_flops",
    "evaluate",
    "format_metrics",
    "gather_rng_states",
    "init_distributed",
    "measure_train_throughput",
    "print_rank0",
    "resume_keys",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "unwrap_model",
]


# torch.compile's modes ("" = eager). reduce-overhead also replays the compiled forward and backward as CUDA graphs.
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_trainer_values(cfg: dict[str, Any]) -> None:
    """The checks both trainers share, before a run writes anything: the optimizer and LR schedule names (one line
    with timm's nearest), and warnings for a warmup longer than the run and a ``data_dir`` the synthetic data does not
    read."""
    import warnings

    check_opt_sched(cfg["opt"], cfg["sched"])
    if cfg["warmup_epochs"] > cfg["epochs"]:
        warnings.warn(
            f"--warmup-epochs {cfg['warmup_epochs']} is longer than the run's {cfg['epochs']} epochs: the LR never "
            f"reaches --lr {cfg['lr']}",
            stacklevel=3,
        )
    if cfg["dataset"] == "synthetic" and cfg["data_dir"]:
        warnings.warn(f"--data-dir {cfg['data_dir']} is not read: the synthetic dataset is generated", stacklevel=3)


@functools.cache
def _timm_schedules() -> list[str]:
    """The schedules timm's create_scheduler_v2 dispatches on, read from the installed timm's source (timm has no
    list of them); empty if that source reads otherwise."""
    import inspect
    import re

    from timm.scheduler import create_scheduler_v2

    return sorted(set(re.findall(r"sched == ['\"](\w+)['\"]", inspect.getsource(create_scheduler_v2))))


def check_opt_sched(opt: str, sched: str) -> None:
    """Refuse, in one line with the nearest valid name, an optimizer or LR schedule timm does not know (timm itself
    would say so only once the model and data are built)."""
    import timm.optim

    from retrain.config import nearest_key

    names = timm.optim.list_optimizers() if hasattr(timm.optim, "list_optimizers") else []  # timm >= 1.0.12
    # timm's factory takes an optional "lookahead_" prefix and case-insensitive names
    if names and opt.lower().split("_")[-1] not in names:
        raise ValueError(f"--opt {opt!r} is not a timm optimizer{nearest_key(opt.lower(), names)}")
    scheds = _timm_schedules()
    if scheds and sched not in scheds:
        raise ValueError(f"--sched {sched!r} is not a timm LR schedule{nearest_key(sched, scheds, list_valid=True)}")


def resume_keys(keys: Iterable[str], opt: str) -> list[str]:
    """``keys`` a resume must keep, less ``momentum`` where the optimizer ``opt`` keeps none in its parameter groups
    (adamw, lamb, ...: a resumed run may pass any value there, it is unused)."""
    keys = list(keys)
    if "momentum" not in keys:
        return keys
    import timm.optim

    try:
        probe = timm.optim.create_optimizer_v2(nn.Linear(1, 1), opt=opt, momentum=0.9)
    except Exception:  # an optimizer timm cannot build here: keep the key (refusing is the safe side)
        return keys
    if any("momentum" in group for group in probe.param_groups):
        return keys
    return [k for k in keys if k != "momentum"]


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a (possibly single-process) run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device in ("auto", ""):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA GPU is visible; use --device cpu")
        return torch.device("cuda", local_rank)
    if device == "cpu":
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; use auto, cuda, cpu or cuda:N") from None


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Set up from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), or a single process.

    Uses NCCL on CUDA and gloo on CPU. Calling it again in an initialized process returns the same info.

    Args:
        device: ``"auto"`` (CUDA when visible), ``"cuda"``, ``"cpu"``.
        timeout_s: how long a collective waits for the other ranks before failing (a dead rank then stops the
            survivors instead of hanging them).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, is_main=rank == 0)


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Mean of a Python number over ranks (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    t = torch.tensor([float(value)], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# --------------------------------------------------------------------------------------------------------------------
# AMP
# --------------------------------------------------------------------------------------------------------------------


def amp_dtype_for(device: torch.device, amp: bool = True) -> torch.dtype | None:
    """bf16 autocast on CUDA (no loss scaler needed), full fp32 on CPU or when ``amp`` is off."""
    return torch.bfloat16 if amp and device.type == "cuda" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (in %) of ``model`` over ``loader``.

    Under DDP the sums are all-reduced, so with an unpadded sampler (``build_loader(train=False)``) every sample is
    counted exactly once and all ranks return the same numbers. Top-5 is top-min(5, classes).
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, targets, reduction="sum")
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        hit = topk.eq(targets[:, None])
        sums[1] += hit[:, :1].any(-1).sum()
        sums[2] += hit.any(-1).sum()
        sums[3] += targets.numel()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {"loss": sums[0].item() / n, "top1": 100.0 * sums[1].item() / n, "top5": 100.0 * sums[2].item() / n}


# --------------------------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------------------------


class RunLogger:
    """TensorBoard scalars/images, ``summary.csv`` (one row per epoch) and one progress line per call.

    Only the main rank writes; on other ranks every method is a no-op, so call sites need no ``if is_main``.

    Args:
        run_dir: the run directory (TensorBoard events go to ``run_dir/tb``).
        is_main: whether this process writes.
        tensorboard: set False to skip TensorBoard (e.g. a quick evaluation).
    """

    def __init__(self, run_dir: str | Path, is_main: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.summary_path = self.run_dir / "summary.csv"
        self._writer = None
        self._t0 = time.time()
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, float(value), step)

    def image(self, tag: str, image: np.ndarray | torch.Tensor, step: int) -> None:
        """Log a CHW image (floats in [0, 1] or uint8)."""
        if self._writer is not None:
            self._writer.add_image(tag, image, step, dataformats="CHW")

    def row(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Append one ``summary.csv`` row (header written with the first row; like timm's ``update_summary``)."""
        if not self.is_main:
            return
        row = {"epoch": epoch, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        write_header = not self.summary_path.exists() or self.summary_path.stat().st_size == 0
        with open(self.summary_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if write_header:
                writer.writeheader()
            writer.writerow(row)
            f.flush()

    def truncate_rows(self, from_epoch: int) -> None:
        """Drop rows with ``epoch >= from_epoch`` (a resumed run repeats them)."""
        if not self.is_main or not self.summary_path.exists():
            return
        with open(self.summary_path, newline="") as f:
            rows = list(csv.DictReader(f))
        fields = list(rows[0]) if rows else []
        kept = [r for r in rows if int(r["epoch"]) < from_epoch]
        tmp = self.summary_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            if fields:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(kept)
        os.replace(tmp, self.summary_path)

    def line(self, text: str) -> None:
        """Print one progress line with the elapsed time (main rank only)."""
        if self.is_main:
            elapsed = time.time() - self._t0
            print(f"[{int(elapsed) // 60:3d}:{int(elapsed) % 60:02d}] {text}", flush=True)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def format_metrics(metrics: dict[str, Any]) -> str:
    """``key value`` pairs for a progress line, numbers rounded for reading; a ``None`` value (a metric the epoch did
    not measure) is left out."""
    parts = []
    for k, v in metrics.items():
        if v is None:
            continue
        if isinstance(v, float):
            parts.append(f"{k} {v:.4g}" if abs(v) < 1e4 else f"{k} {v:.3e}")
        else:
            parts.append(f"{k} {v}")
    return "  ".join(parts)


# --------------------------------------------------------------------------------------------------------------------
# RNG state (tensors and lists only, so checkpoints load with weights_only=True)
# --------------------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG this process uses: torch CPU, CUDA (all devices), numpy and Python ``random``."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where the device count matches)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state` (index = rank), so that a resumed DDP run continues each rank's streams.

    A collective under DDP: call it on every rank.
    """
    state = rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


class DivergedError(ValueError):
    """Too many non-finite steps: the run stops; the message is one line naming the step and what to try."""


class BadStepGuard:
    """Skips steps whose loss or gradients are not finite, asks for a rollback after ``rollback_after`` in a row,
    and stops the run after ``max_bad_steps`` in all.

    Under DDP one all-reduce per check makes every rank take the same decision; the same all-reduce carries the
    "a signal arrived" flag, so that all ranks stop at the same step boundary. ``poison_loss_at`` /
    ``poison_grad_at`` are a test hook: the checks with these indices (0-based, counting every check of this
    process, skipped ones included) get a NaN loss / a NaN gradient, standing in for an fp16 overflow.

    Args:
        rollback_after: consecutive bad steps that trigger a rollback (0 = never roll back).
        max_bad_steps: bad steps in all (across rollbacks) after which :meth:`check` raises :class:`DivergedError`.
        device: where the flag tensor lives (the backend's device).
        hint: what to try, appended to the stop message.
    """

    def __init__(
        self,
        rollback_after: int,
        max_bad_steps: int,
        device: torch.device,
        hint: str = "",
        poison_loss_at: Iterable[int] = (),
        poison_grad_at: Iterable[int] = (),
    ) -> None:
        self.rollback_after, self.max_bad_steps, self.device, self.hint = rollback_after, max_bad_steps, device, hint
        self.poison_loss_at, self.poison_grad_at = set(poison_loss_at), set(poison_grad_at)
        self.checks = 0  # losses checked by this process (the test hook's clock)
        self.in_a_row = 0
        self.total = 0
        self.rollbacks = 0

    def poison(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss, or NaN when the test hook says so for the coming check (call before ``backward``)."""
        return loss * float("nan") if self.checks in self.poison_loss_at else loss

    def check(
        self, loss: torch.Tensor, params: Iterable[nn.Parameter], step: int, stop: bool = False
    ) -> tuple[str, bool]:
        """Decide, on every rank alike, what to do with a step whose backward has run.

        Args:
            loss: this rank's loss (a scalar).
            params: the parameters about to be stepped (their ``.grad`` is checked).
            step: the optimizer step this would be (for messages).
            stop: whether this rank received a stop signal.

        Returns:
            ``(verdict, stop_any)``: verdict ``"ok"`` (step), ``"skip"`` or ``"rollback"`` (do not step); and
            whether any rank received a stop signal.

        Raises:
            DivergedError: the ``max_bad_steps``-th bad step.
        """
        grads = [p.grad for p in params if p.grad is not None]
        if self.checks in self.poison_grad_at and grads:
            grads[0].fill_(float("nan"))
        self.checks += 1
        bad = not torch.isfinite(loss.detach()).all()
        if not bad and grads:
            # One reduction over all gradients: a NaN or inf anywhere makes the sum of norms non-finite.
            bad = not torch.isfinite(torch.stack([g.detach().float().norm() for g in grads]).sum())
        flags = torch.tensor([float(bad), float(stop)], device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags)
        stop_any = bool(flags[1] > 0)
        if flags[0] == 0:
            self.in_a_row = 0
            return "ok", stop_any
        self.in_a_row += 1
        self.total += 1
        print_rank0(f"step {step}: non-finite loss or gradient, skipped ({self.in_a_row} in a row, {self.total} total)")
        if self.total >= self.max_bad_steps:
            raise DivergedError(
                f"stopped at step {step}: {self.total} non-finite losses or gradients ({self.in_a_row} in a row, "
                f"{self.rollbacks} rollbacks); {self.hint}"
            )
        if self.rollback_after and self.in_a_row >= self.rollback_after:
            self.in_a_row = 0
            self.rollbacks += 1
            return "rollback", stop_any
        return "skip", stop_any


class StopFlag:
    """SIGINT/SIGTERM set ``signum``; a training loop checkpoints at the next step boundary and returns.

    A repeat of either signal at least ``repeat_after`` seconds after the first stops at once, as if this flag were not
    there (the previous handlers run: KeyboardInterrupt for SIGINT, termination for SIGTERM's default): the way out of
    a step that does not finish. The last checkpoint written stays as it was. Repeats sooner than that are taken as
    the same request delivered twice (e.g. a scheduler signalling every process of a job while torchrun forwards its
    own copy to the workers), so they do not skip the checkpoint.

    Use as a context manager; the previous handlers come back on exit. Outside the main thread (where signals cannot
    be handled, e.g. some Ray workers) it is inert.
    """

    def __init__(self, repeat_after: float = 3.0) -> None:
        self.signum = 0
        self.repeat_after = repeat_after
        self._first_at = 0.0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:
            self._old = {}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            if time.monotonic() - self._first_at >= self.repeat_after:
                self.__exit__()
                signal.raise_signal(signum)
            return
        self.signum, self._first_at = signum, time.monotonic()
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"{signal.Signals(signum).name}: stopping at the next step boundary (checkpoint, then exit); "
                f"send it again after {self.repeat_after:g} s to stop now",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


# --------------------------------------------------------------------------------------------------------------------
# Model cost
# --------------------------------------------------------------------------------------------------------------------


def count_params_flops(model: nn.Module, img_size: int, in_chans: int) -> tuple[int, int]:
    """Parameters and FLOPs of one image's forward pass.

    Defers to ``supernet.count_params_flops`` when the model zoo provides it (its scan op counts itself), so that
    every table uses one rule. Otherwise: ``torch.utils.flop_counter.FlopCounterMode`` on one image, reported as
    multiply-accumulates, the convention of timm/fvcore tables (mambaout_femto ≈ 1.2 G at 224²).

    Returns:
        ``(params, flops)``; parameters count only trainable ones of the model given (arch logits included).
    """
    model = unwrap_model(model)
    try:
        from supernet import count_params_flops as zoo_count  # type: ignore[attr-defined]
    except ImportError:
        zoo_count = None
    if zoo_count is not None:
        out = zoo_count(model, img_size=img_size, in_chans=in_chans)
        if isinstance(out, dict):
            return int(out["params"]), int(out["flops"])
        return int(out[0]), int(out[1])
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_chans, img_size, img_size, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    model.train(was_training)
    return int(params), int(counter.get_total_flops() // 2)


def measure_train_throughput(
    model: nn.Module,
    img_size: int,
    in_chans: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    steps: int = 10,
    warmup: int = 3,
    num_classes: int | None = None,
) -> float:
    """Training images per second: forward, backward and an AdamW step on random data.

    Runs on a deep copy, so the model given is not changed. On CUDA the timing is synchronized around the measured
    steps.
    """
    device = torch.device(device)
    net = copy.deepcopy(unwrap_model(model)).to(device).train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-6)
    x = torch.randn(batch_size, in_chans, img_size, img_size, device=device)
    with torch.no_grad(), autocast(device, amp_dtype):
        n_out = net(x[:1]).shape[-1] if num_classes is None else num_classes
    y = torch.randint(0, n_out, (batch_size,), device=device)

    def step() -> None:
        with autocast(device, amp_dtype):
            loss = F.cross_entropy(net(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    return batch_size * steps / dt if dt > 0 else math.inf


def print_rank0(*args: Any, **kwargs: Any) -> None:
    """``print`` on the main rank only (stderr by default: messages, not results)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        kwargs.setdefault("file", sys.stderr)
        print(*args, **kwargs, flush=True)


def git_commit() -> str | None:
    """The short commit of the running code (provenance in checkpoints and arch files), when run from a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
