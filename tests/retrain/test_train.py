"""retrain.train end to end on tiny synthetic runs (CPU, reference scan)."""

from __future__ import annotations

import csv
import os
import signal

import pytest
import torch
import yaml

from retrain.checkpoint import load_checkpoint
from retrain.config import ConfigError, run_cli
from retrain.train import DEFAULTS, main

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


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared CPU: thread hand-offs cost more than the math."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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

    best = os.path.join(out["run_dir"], "best.pt")
    state = load_checkpoint(best, expect_kind="retrain", expect_model="test_vim")
    again = main({"eval_only": best, "device": "cpu"})
    assert again["top1"] == pytest.approx(state["metrics"]["ema_top1"], abs=1e-9)
    assert again["loss"] == pytest.approx(state["metrics"]["ema_loss"], rel=1e-6)
    assert "eval" in capsys.readouterr().out


def test_refuses_to_clobber(tmp_path) -> None:
    _run(tmp_path, epochs=1, experiment="x")
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume auto"):
        _run(tmp_path, epochs=1, experiment="x")


def test_interrupt_and_resume_is_exact(tmp_path) -> None:
    """SIGTERM mid-run saves at the next step (mid-epoch); --resume auto ends bit-identical to a straight run."""
    kw = {"shuffle_max": 0.5, "mixup": 0.2}
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
    a = load_checkpoint(tmp_path / "runs" / "straight" / "last.pt")["model_state"]
    b = load_checkpoint(tmp_path / "runs" / "resumed" / "last.pt")["model_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in _rows(resumed["run_dir"])] == ["0", "1"]
    assert resumed["top1"] == straight["top1"]


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
