"""A resume that would not fit the saved state is refused in one line and changes nothing in the run directory.

What a checkpoint's state depends on besides the model: the optimizer (``--opt``: another one's state lacks the
entries it reads, e.g. sgd's ``momentum``), the LR schedule and the number of steps per epoch (the position in the
epoch and the per-step schedule count in them; another ``--num-samples`` changes it). Each refusal leaves every file
of the run as it was, ``args.yaml`` included. What does not change the saved state is accepted: the same data from
another folder, another scan implementation (``scan_backend``) or recomputation (``scan_recompute``). A run that
already finished says so and writes nothing.

The runs are real ``retrain.train`` / ``nas.search`` command lines (``run_cli``, in process) on tiny models: a first
run is stopped by SIGTERM at the first step of its second epoch (a mid-epoch ``last.pt``), and copies of it are
resumed.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from reliability_testutils import fingerprint

import nas.search as search
import retrain.train as train
from retrain.checkpoint import CheckpointError, check_resume_steps, load_checkpoint
from retrain.config import resolve_config, run_cli

TRAIN = ["--model", "test_vim", "--img-size", "16", "--num-samples", "32", "--batch-size", "16", "--epochs", "2"]
TRAIN += ["--warmup-epochs", "0", "--device", "cpu", "--log-interval", "1000"]
SEARCH = ["--model", "test_local_vim_search", "--img-size", "16", "--num-samples", "64", "--batch-size", "16"]
SEARCH += ["--epochs", "2", "--warmup-epochs", "0", "--arch-warmup-epochs", "0", "--device", "cpu"]
SEARCH += ["--log-interval", "1000"]
TRAINERS = {"retrain": (train, TRAIN), "search": (search, SEARCH), "gdas": (search, [*SEARCH, "--algo", "gdas"])}


def _sigterm_after_first_epoch(epoch: int, metrics: dict, path: Path) -> None:
    if epoch == 0:  # the trainer's own signal handling: last.pt at the next step (mid-epoch 1), then it returns
        signal.raise_signal(signal.SIGTERM)


def _start_mid_epoch(module, args: list[str]) -> None:
    """A run stopped at the first step of its second epoch: its last.pt is mid-epoch."""
    main = functools.partial(module.main, on_epoch=_sigterm_after_first_epoch)
    assert run_cli(main, module.DEFAULTS, args) == 128 + signal.SIGTERM


@pytest.fixture(scope="module")
def mid_epoch_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One mid-epoch run per trainer (its ``--output`` folder, experiment ``run``); tests resume copies of it."""
    out = {}
    for which, (module, args) in TRAINERS.items():
        runs = tmp_path_factory.mktemp(f"mid_{which}") / "runs"
        _start_mid_epoch(module, [*args, "--output", str(runs), "--experiment", "run"])
        state = load_checkpoint(runs / "run" / "last.pt")
        assert (state["epoch"], state["next_epoch"], state["next_batch"], state["steps_per_epoch"]) == (1, 1, 1, 2)
        out[which] = runs
    return out


REFUSED = [
    ("retrain", ["--opt", "sgd"],
     r"was trained with --opt 'adamw', but this run asks for --opt 'sgd'; its LR schedule, optimizer state, data order "
     r"and validation split follow the former: resume with"),
    ("retrain", ["--opt", "lamb"], r"--opt 'adamw', but this run asks for --opt 'lamb'"),
    ("search", ["--opt", "sgd"], r"was trained with --opt 'adamw', but this run asks for --opt 'sgd'"),
    ("retrain", ["--num-samples", "64"],
     r"was saved at 2 steps per epoch \(32 training images\), but this run takes 4 \(64 training images\); its "
     r"position in the epoch and its per-step LR schedule count in the former: resume with the run's own data "
     r"\(--num-samples, .*or start a new --experiment$"),
    ("search", ["--num-samples", "128"], r"was saved at 2 steps per epoch \(32 weight-set images\), but this run takes "
                                         r"4 \(64 weight-set images\)"),
    ("retrain", ["--model-kwargs", "d_state=3"], r"was built with d_state=4, but this run asks for d_state=3"),
    ("search", ["--epochs", "3"], r"was trained with --epochs 2, but this run asks for --epochs 3"),
    # the optimizers' hyperparameters: their saved param groups would override the new values silently
    ("retrain", ["--weight-decay", "0.01"], r"was trained with --weight-decay 0.05, but this run asks for "),
    ("search", ["--arch-lr", "0.01"], r"was trained with --arch-lr 0.0003, but this run asks for --arch-lr 0.01"),
    ("search", ["--arch-betas", "0.9", "0.999"], r"--arch-betas \[0.5, 0.999\], but this run asks for "),
    # the EMA kept (or not) in the checkpoint, the arch warm-up, and GDAS's temperature schedule and sampled paths
    ("retrain", ["--model-ema"], r"was trained with --model-ema False, but this run asks for --model-ema True"),
    ("search", ["--arch-warmup-epochs", "1"], r"--arch-warmup-epochs 0, but this run asks for --arch-warmup-epochs 1"),
    ("gdas", ["--tau-max", "5"], r"was trained with --tau-max 10.0, but this run asks for --tau-max 5.0"),
    ("gdas", ["--gdas-top-m", "2"], r"was trained with --gdas-top-m 1, but this run asks for --gdas-top-m 2"),
]  # fmt: skip


@pytest.mark.parametrize(("which", "change", "expect"), REFUSED, ids=[f"{w}-{' '.join(c)}" for w, c, _ in REFUSED])
def test_a_refused_resume_is_one_line_and_changes_nothing(
    mid_epoch_runs, tmp_path, capsys, which: str, change: list[str], expect: str
) -> None:
    module, args = TRAINERS[which]
    runs = tmp_path / "runs"
    shutil.copytree(mid_epoch_runs[which], runs)
    before = fingerprint(runs)
    assert "run/args.yaml" in before and "run/summary.csv" in before and "run/last.pt" in before
    capsys.readouterr()
    code = run_cli(module.main, module.DEFAULTS, [*args, "--output", str(runs), "--experiment", "run",
                                                  "--resume", "auto", *change])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()  # "resume auto: using ..." first, then the error
    assert code == 2 and "Traceback" not in "\n".join(err), err
    assert [line for line in err if line.startswith("error: ")] == err[-1:], err
    assert re.search(expect, err[-1]), err[-1]
    assert fingerprint(runs) == before  # args.yaml, summary.csv, checkpoints, TensorBoard: all as they were


def test_the_same_data_from_another_folder_resumes_mid_epoch(tmp_path, capsys) -> None:
    """Steps per epoch, not the data's path, are compared: a moved dataset resumes."""
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (32, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 32).astype(np.uint8),
        "x_test": rng.integers(0, 256, (16, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 16).astype(np.uint8),
    }
    (tmp_path / "old").mkdir()
    np.savez(tmp_path / "old" / "data.npz", **arrays)
    args = [*TRAIN, "--dataset", "mnist", "--output", str(tmp_path / "runs"), "--experiment", "run"]
    _start_mid_epoch(train, [*args, "--data-dir", str(tmp_path / "old" / "data.npz")])
    (tmp_path / "old").rename(tmp_path / "new")
    capsys.readouterr()
    code = run_cli(train.main, train.DEFAULTS, [*args, "--data-dir", str(tmp_path / "new" / "data.npz"),
                                                "--resume", "auto"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0 and "at epoch 1, batch 1, step 3" in err, err
    end = load_checkpoint(tmp_path / "runs" / "run" / "last.pt")
    assert (end["next_epoch"], end["step"], end["steps_per_epoch"], end["train_size"]) == (2, 4, 2, 32)


def test_scan_backend_and_recompute_may_change_on_resume(mid_epoch_runs, tmp_path, capsys) -> None:
    """Which implementation runs the scan, and whether its backward recomputes chunk states, change no saved state."""
    runs = tmp_path / "runs"
    shutil.copytree(mid_epoch_runs["retrain"], runs)
    capsys.readouterr()
    code = run_cli(train.main, train.DEFAULTS, [*TRAIN, "--output", str(runs), "--experiment", "run",
                                                "--resume", "auto", "--model-kwargs", "scan_backend=ref",
                                                "scan_recompute=true"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0 and "at epoch 1, batch 1, step 3" in err, err
    end = load_checkpoint(runs / "run" / "last.pt")
    assert end["next_epoch"] == 2 and end["model_spec"]["kwargs"]["scan_backend"] == "ref"


def test_momentum_is_kept_only_where_the_optimizer_uses_it(mid_epoch_runs, tmp_path, capsys) -> None:
    """adamw keeps no momentum in its parameter groups: another --momentum changes nothing there, and resumes."""
    from retrain.engine import resume_keys

    assert "momentum" not in resume_keys(train.RESUME_KEYS, "adamw")
    assert "momentum" in resume_keys(train.RESUME_KEYS, "sgd") and "weight_decay" in resume_keys(
        train.RESUME_KEYS, "adamw"
    )
    runs = tmp_path / "runs"
    shutil.copytree(mid_epoch_runs["retrain"], runs)
    capsys.readouterr()
    code = run_cli(train.main, train.DEFAULTS, [*TRAIN, "--output", str(runs), "--experiment", "run",
                                                "--resume", "auto", "--momentum", "0.5"])  # fmt: skip
    assert code == 0 and "at epoch 1, batch 1, step 3" in capsys.readouterr().err


@pytest.mark.parametrize("which", list(TRAINERS))
def test_a_finished_run_resumed_says_so_and_writes_nothing(tmp_path, capsys, which: str) -> None:
    module, args = TRAINERS[which]
    args = [*args, "--epochs", "1", "--output", str(tmp_path / "runs"), "--experiment", "run"]
    if which == "retrain":
        args += ["--val-frac", "0.25"]  # its test.json must not be rewritten either
    assert run_cli(module.main, module.DEFAULTS, args) == 0
    before = fingerprint(tmp_path / "runs")
    capsys.readouterr()
    assert run_cli(module.main, module.DEFAULTS, [*args, "--resume", "auto"]) == 0
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    run_dir = tmp_path / "runs" / "run"
    steps = 1 if which == "retrain" else 2  # retrain: 24 of 32 images trained on (val-frac 0.25), 16 per batch
    todo = (
        "nothing to train: start a new --experiment to train again"
        if which == "retrain"
        else f"nothing to search: derive its arch with python -m nas.vis_search_prob {run_dir}, or start a new "
        f"--experiment"
    )
    assert err[-1] == f"{run_dir} already finished (epoch 1 of 1, step {steps}); {todo}", err
    assert not [line for line in err if line.startswith("resumed ")] and captured.out == ""
    out = module.main(resolve_config(module.DEFAULTS, [*args, "--resume", "auto"]))  # what a caller gets back
    assert out["epochs_run"] == 0 and not out["interrupted"] and out["best_epoch"] == 0
    if which == "retrain":
        assert {"top1", "test_top1"} <= set(out)
    else:
        assert len(out["history"]) == 1 and "arch_top1" in out
    assert fingerprint(tmp_path / "runs") == before


def test_steps_per_epoch_are_compared_only_where_recorded(tmp_path) -> None:
    path = tmp_path / "last.pt"
    check_resume_steps({}, 4, 64, path)  # an older checkpoint: not recorded, passes
    check_resume_steps({"steps_per_epoch": 4, "train_size": 64}, 4, 70, path)  # same steps: passes
    with pytest.raises(CheckpointError, match=r"saved at 4 steps per epoch \(64 training images\), but this run takes "
                                              r"2 \(32 training images\)") as e:  # fmt: skip
        check_resume_steps({"steps_per_epoch": 4, "train_size": 64}, 2, 32, path)
    assert "\n" not in str(e.value)


def test_a_finished_run_without_its_final_test_is_tested_on_resume(tmp_path, capsys) -> None:
    """A held-out-validation run killed during its final test (test.json never written) gets that test on resume,
    and nothing else of the run changes."""
    module, args = TRAINERS["retrain"]
    args = [*args, "--epochs", "1", "--val-frac", "0.25", "--output", str(tmp_path / "runs"), "--experiment", "run"]
    assert run_cli(module.main, module.DEFAULTS, args) == 0
    run_dir = tmp_path / "runs" / "run"
    test_json = run_dir / "test.json"
    want = json.loads(test_json.read_text())
    test_json.unlink()  # as if killed during the final test
    before = fingerprint(tmp_path / "runs")
    capsys.readouterr()
    out = module.main(resolve_config(module.DEFAULTS, [*args, "--resume", "auto"]))
    err = capsys.readouterr().err
    assert "has no test.json (its final test did not complete): testing it now" in err
    assert json.loads(test_json.read_text()) == want  # the same model, the same test split
    assert out["epochs_run"] == 0 and out["test_top1"] == want["test_top1"]
    after, before = fingerprint(tmp_path / "runs"), {k: v for k, v in before.items() if k != "run"}
    after.pop("run/test.json"), after.pop("run")  # the new file, and so its folder's mtime
    assert after == before


def test_another_runs_finished_checkpoint_is_named_by_its_own_folder(tmp_path, capsys) -> None:
    module, args = TRAINERS["search"]
    args = [*args, "--epochs", "1", "--output", str(tmp_path / "runs")]
    assert run_cli(module.main, module.DEFAULTS, [*args, "--experiment", "a"]) == 0
    capsys.readouterr()
    ckpt = tmp_path / "runs" / "a" / "last.pt"
    assert run_cli(module.main, module.DEFAULTS, [*args, "--experiment", "b", "--resume", str(ckpt)]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"{ckpt.parent} already finished") and f"vis_search_prob {ckpt.parent}," in line
