"""retrain.train end to end on tiny synthetic runs (CPU, reference scan)."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from retrain.checkpoint import load_checkpoint
from retrain.config import ConfigError, run_cli
from retrain.train import DEFAULTS, build_splits, main

TINY = {
    "model": "test_vim",
    "dataset": "synthetic",
    "img_size": 16,
    "num_samples": 256,
    "batch_size": 32,
    "epochs": 2,
    "lr": 3e-3,
    "warmup_epochs": 0,
    "smoothing": 0.0,
    "log_interval": 1000,
    "device": "cpu",
}


def _run(tmp_path, **kw):
    return main({**TINY, "output": str(tmp_path / "runs"), **kw})


def _rows(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "summary.csv")) as f:
        return list(csv.DictReader(f))


def test_tiny_run_learns_and_eval_only_reproduces(tmp_path, capsys) -> None:
    out = _run(tmp_path, epochs=3, num_samples=512, experiment="learn", model_ema=True, checkpoint_hist=2)
    rows = _rows(out["run_dir"])
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert out["best_metric"] > 10.0 + 5.0  # 10 classes: chance is 10 %
    assert out["params"] > 0 and out["flops"] > 0 and out["train_img_s"] > 0
    files = sorted(os.listdir(out["run_dir"]))
    assert {"args.yaml", "summary.csv", "last.pt", "best.pt", "tb"} <= set(files)
    assert len([f for f in files if f.startswith("checkpoint-")]) == 2
    saved = yaml.safe_load(open(os.path.join(out["run_dir"], "args.yaml")))
    assert saved["epochs"] == 3 and set(saved) == set(DEFAULTS)
    assert "test.json" not in files and "test_top1" not in out  # val_frac 0: the test split is the validation set

    best = os.path.join(out["run_dir"], "best.pt")
    state = load_checkpoint(best, expect_kind="retrain", expect_model="test_vim")
    capsys.readouterr()
    # Flags that describe another model or data are ignored, and said to be.
    again = main({"eval_only": best, "device": "cpu", "model": "test_vmamba", "img_size": 48})
    assert again["top1"] == pytest.approx(state["metrics"]["ema_top1"], abs=1e-9)
    assert again["loss"] == pytest.approx(state["metrics"]["ema_loss"], rel=1e-6)
    printed = capsys.readouterr().out
    assert "note: --eval-only rebuilds the checkpoint's own model and data; ignored: " in printed
    assert "--model test_vmamba" in printed and "--img-size 48" in printed and "--device" not in printed
    assert f"(epoch {state['epoch']}, the test split):" in printed
    # A flag given on the command line at its default value is ignored too, and named (the run was at 16 px).
    assert run_cli(main, DEFAULTS, ["--eval-only", best, "--img-size", "32", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "ignored: --img-size 32" in printed and "--model" not in printed

    # timm's own loaders read the checkpoint (its EMA weights, which made best.pt's metric), and timm's pretrained
    # path resamples the position embedding for another image size.
    import timm
    from timm.layers import resample_abs_pos_embed

    ema = state["state_dict_ema"]
    for kw in ({"checkpoint_path": best}, {"pretrained": True, "pretrained_cfg_overlay": {"file": best}}):
        loaded = timm.create_model("test_vim", img_size=16, **kw).state_dict()
        assert loaded.keys() == ema.keys() and all(torch.equal(loaded[k], ema[k]) for k in ema)
    big = timm.create_model("test_vim", img_size=32, pretrained=True, pretrained_cfg_overlay={"file": best})
    g = big.grid
    assert g[0] * g[1] > ema["pos_embed"].shape[1]
    side = int(ema["pos_embed"].shape[1] ** 0.5)
    expected = resample_abs_pos_embed(ema["pos_embed"], list(g), old_size=[side, side], num_prefix_tokens=0)
    assert torch.equal(big.pos_embed.detach(), expected)
    assert torch.equal(big.blocks[0].mixer.x_proj_weight.detach(), ema["blocks.0.mixer.x_proj_weight"])


def test_refuses_to_clobber(tmp_path) -> None:
    out = _run(tmp_path, epochs=1, experiment="x")
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume auto"):
        _run(tmp_path, epochs=1, experiment="x")
    # A run that left its files but no checkpoint: refused too, and --resume auto restarts it in place.
    for ckpt in Path(out["run_dir"]).glob("*.pt"):
        ckpt.unlink()
    with pytest.raises(ValueError, match="holds another run's args.yaml, summary.csv but no checkpoint"):
        _run(tmp_path, epochs=1, experiment="x")
    again = _run(tmp_path, epochs=1, experiment="x", resume="auto")
    assert [int(r["epoch"]) for r in _rows(again["run_dir"])] == [0] and (Path(again["run_dir"]) / "last.pt").is_file()
    # A checkpoint resumed with the flags it was made with is accepted (the spec compares as plain values); one whose
    # LR schedule would change (more epochs: the saved cosine has ended at min_lr) is refused in one line.
    _run(tmp_path, epochs=1, experiment="x", resume="auto")
    with pytest.raises(ValueError, match=r"trained with --epochs 1, but this run asks for --epochs 2; its LR sched"):
        _run(tmp_path, epochs=2, experiment="x", resume="auto")


@pytest.mark.parametrize("val_frac", [0.0, 0.25])
def test_interrupt_and_resume_is_exact(tmp_path, val_frac) -> None:
    """SIGTERM mid-run saves at the next step (mid-epoch); --resume auto ends bit-identical to a straight run."""
    kw = {"shuffle_max": 0.5, "mixup": 0.2, "val_frac": val_frac}
    straight = _run(tmp_path, experiment="straight", **kw)

    def interrupt(epoch, metrics, path):
        assert path.name == "last.pt" and path.is_file()
        os.kill(os.getpid(), signal.SIGTERM)

    first = main({**TINY, "output": str(tmp_path / "runs"), "experiment": "resumed", **kw}, on_epoch=interrupt)
    assert first["interrupted"] and first["epochs_run"] == 1
    state = load_checkpoint(tmp_path / "runs" / "resumed" / "last.pt")
    assert (state["next_epoch"], state["next_batch"]) == (1, 1)
    resumed = _run(tmp_path, experiment="resumed", resume="auto", **kw)
    assert not resumed["interrupted"] and resumed["epochs_run"] == 1
    a = load_checkpoint(tmp_path / "runs" / "straight" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "runs" / "resumed" / "last.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in _rows(resumed["run_dir"])] == ["0", "1"]
    assert resumed["top1"] == straight["top1"]
    if val_frac:  # the held-out split is a pure function of (seed, val_frac): the same after a resume
        assert resumed["test_loss"] == straight["test_loss"]


def _arch(tmp_path, depth: int) -> str:
    arch = {
        "format_version": 1,
        "model": "test_local_vim",
        "space": "localmamba",
        "layers": [{"label": f"blocks.{i}", "orders": ["h", "h_flip", "w2", "w2_flip"]} for i in range(depth)],
    }
    path = tmp_path / f"arch{depth}.yaml"
    path.write_text(yaml.safe_dump(arch))
    return str(path)


def test_arch_file_and_mismatch(tmp_path, capsys) -> None:
    out = _run(tmp_path, model="", arch=_arch(tmp_path, 2), epochs=1, experiment="arch")
    assert out["model"] == "test_local_vim"
    code = run_cli(main, DEFAULTS, ["--arch", _arch(tmp_path, 3), "--output", str(tmp_path / "runs"), "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert "3 layers" in err and "2 searchable layers" in err
    out = _run(tmp_path, model="test_vim", arch=_arch(tmp_path, 2), epochs=1, experiment="arch2")
    assert out["model"] == "test_local_vim"
    assert "model 'test_vim' is ignored" in capsys.readouterr().out


def test_bad_requests_are_one_line(tmp_path) -> None:
    with pytest.raises(ValueError, match="needs one of our Mamba models"):
        _run(tmp_path, model="test_vit", shuffle_max=0.5)
    with pytest.raises(ValueError, match="unknown model 'test_vimm'; did you mean 'test_vim'"):
        _run(tmp_path, model="test_vimm")
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        _run(tmp_path, epoch=3)
    with pytest.raises(ValueError, match="--shuffle-max 1.5 is out of range"):
        _run(tmp_path, shuffle_max=1.5)
    with pytest.raises(ValueError, match="--compile 'fast' is out of range; use a value among '', 'default'"):
        _run(tmp_path, compile="fast")
    with pytest.raises(ValueError, match="--scan-sums 'exact' is out of range; use a value among 'fixed', 'butterfly'"):
        _run(tmp_path, scan_sums="exact")


class _Stop(Exception):
    pass


@pytest.mark.parametrize("entry", ["retrain.train", "nas.search"])
def test_scan_sums_reach_the_kernels(tmp_path, monkeypatch, entry) -> None:
    """--scan-sums sets the scan backward's channel sums for the process before the run starts (GPU bf16 runs take
    them): fixed by default, butterfly or packed on request."""
    import importlib

    import kernels.triton_scan as ts

    mod = importlib.import_module(entry)

    def stop(*args, **kwargs):
        raise _Stop((ts._FIXED_SUMS, ts._PACKED_SUMS))

    monkeypatch.setattr(mod, "init_distributed", stop)
    monkeypatch.setattr(ts, "_FIXED_SUMS", ts._FIXED_SUMS)
    monkeypatch.setattr(ts, "_PACKED_SUMS", ts._PACKED_SUMS)
    seen = []
    for mode in ("packed", "butterfly", "fixed"):
        with pytest.raises(_Stop) as info:
            mod.main({"output": str(tmp_path), "scan_sums": mode})
        seen.append(info.value.args[0])
    assert seen == [(False, True), (False, False), (True, False)]


def test_held_out_split_is_disjoint_seeded_and_unaugmented(tmp_path) -> None:
    cfg = {**DEFAULTS, **TINY, "val_frac": 0.25}
    train, held, test, info = build_splits(cfg)
    assert len(held) == 64 and len(train) == 192 and len(test) == 64 and info.num_classes == 10
    assert set(train.indices).isdisjoint(held.indices) and set(train.indices) | set(held.indices) == set(range(256))
    assert held.dataset is not train.dataset  # the held-out part comes from a copy built without augmentation
    _, again, _, _ = build_splits(cfg, train=False)  # a pure function of (seed, val_frac): resume and eval agree
    assert again.indices == held.indices
    _, other, _, _ = build_splits({**cfg, "seed": 1}, train=False)
    assert other.indices != held.indices
    train0, val0, test0, _ = build_splits({**cfg, "val_frac": 0.0})
    assert test0 is None and len(train0) == 256 and len(val0) == 64
    # An array dataset: training augments, the held-out part does not.
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), np.arange(20, dtype=np.uint8) % 10
    np.savez(tmp_path / "fm.npz", x_train=images, y_train=labels, x_test=images[:4], y_test=labels[:4])
    fm = {**cfg, "dataset": "fashion_mnist", "data_dir": str(tmp_path / "fm.npz"), "img_size": 28, "num_samples": 0}
    train, held, test, _ = build_splits(fm)
    assert (len(train), len(held), len(test)) == (15, 5, 4) and train.dataset.train and not held.dataset.train


def test_val_frac_selects_on_held_out_and_tests_once_at_the_end(tmp_path, capsys) -> None:
    seen = []

    def no_test_yet(epoch, metrics, path):
        seen.append(epoch)
        assert not (path.parent / "test.json").exists() and not any(k.startswith("test_") for k in metrics)

    cfg = {**TINY, "output": str(tmp_path / "runs"), "experiment": "ho", "val_frac": 0.25, "model_ema": True}
    out = main({**cfg, "epochs": 3, "checkpoint_hist": 1}, on_epoch=no_test_yet)
    assert seen == [0, 1, 2]
    rows = _rows(out["run_dir"])
    assert not any(k.startswith("test_") or k.startswith("ema_test_") for k in rows[0])
    # best.pt is the epoch with the best held-out metric (EMA's, as EMA is on).
    held = [float(r["ema_top1"]) for r in rows]
    assert out["best_metric"] == pytest.approx(max(held)) and out["best_epoch"] == held.index(max(held))
    best = os.path.join(out["run_dir"], "best.pt")
    state = load_checkpoint(best, expect_kind="retrain")
    assert state["epoch"] == out["best_epoch"] and state["config"]["val_frac"] == 0.25
    # The test split is evaluated once, at the end, for the final model and its EMA.
    report = json.loads(open(os.path.join(out["run_dir"], "test.json")).read())
    for k in ("test_top1", "test_top5", "test_loss", "ema_test_top1", "ema_test_top5", "ema_test_loss"):
        assert report[k] == pytest.approx(out[k]), k
    assert report["val_frac"] == 0.25 and report["seed"] == 0
    assert out["test_loss"] != pytest.approx(out["loss"])  # the held-out set is not the test split
    printed = capsys.readouterr().out
    assert "final test (64 images): test_loss" in printed and "ema_test_top1" in printed
    # --eval-only rebuilds the same held-out split from the checkpoint's config and reproduces its metric.
    again = main({"eval_only": best, "device": "cpu"})
    assert again["top1"] == pytest.approx(state["metrics"]["ema_top1"], abs=1e-9)
    assert again["loss"] == pytest.approx(state["metrics"]["ema_loss"], rel=1e-6)
    printed = capsys.readouterr().out
    assert "held-out 0.25 of train, seed 0):" in printed and "ignored" not in printed


def test_bad_val_frac_is_one_line(tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match=r"--val-frac 1.0 is out of range; use a value in \[0, 1\)"):
        _run(tmp_path, val_frac=1.0)
    with pytest.raises(ValueError, match="--val-frac 0.001: cannot split 256 items"):
        _run(tmp_path, val_frac=0.001)
    code = run_cli(main, DEFAULTS, ["--model", "test_vim", "--val-frac", "-0.1", "--output", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --val-frac -0.1 is out of range") and "\n" not in err
    # A resume keeps the split: another val_frac is refused rather than mixing validation sets.
    _run(tmp_path, epochs=1, experiment="vf", val_frac=0.25)
    with pytest.raises(ValueError, match=r"--val-frac 0.25, but this run asks for --val-frac 0.0; its LR schedule"):
        _run(tmp_path, epochs=1, experiment="vf", resume="auto")


def test_warmup_longer_than_the_run_and_an_unread_data_dir_warn(tmp_path) -> None:
    with pytest.warns(UserWarning, match=r"--warmup-epochs 3 is longer than the run's 1 epochs: the LR never reaches"):
        with pytest.warns(UserWarning, match=r"--data-dir nowhere is not read: the synthetic dataset is generated"):
            _run(tmp_path, epochs=1, warmup_epochs=3, data_dir="nowhere", num_samples=64)
