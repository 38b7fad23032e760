"""nas.search end to end on tiny synthetic runs (CPU, reference scan), its pure schedules, and a 2-process DDP run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import kernels
import nas.search as search
from nas.search import DEFAULTS, arch_param_groups, gdas_tau, main, weight_param_groups
from retrain.checkpoint import load_checkpoint
from retrain.engine import seed_everything

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "model": "test_local_vim_search",
    "dataset": "synthetic",
    "img_size": 16,
    "num_samples": 256,
    "batch_size": 32,
    "epochs": 2,
    "lr": 3e-3,
    "arch_lr": 3e-2,
    "warmup_epochs": 0,
    "arch_warmup_epochs": 0,
    "log_interval": 1000,
    "device": "cpu",
}


def _run(tmp_path, on_epoch=None, **kw):
    return main({**TINY, "output": str(tmp_path / "runs"), **kw}, on_epoch=on_epoch)


def _probs(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "arch_probs.jsonl"))]


def test_gdas_tau_is_linear_and_clamped() -> None:
    assert gdas_tau(0, 11, 10.0, 0.1) == 10.0
    assert gdas_tau(10, 11, 10.0, 0.1) == pytest.approx(0.1)
    assert gdas_tau(5, 11, 10.0, 0.1) == pytest.approx(5.05)
    assert gdas_tau(50, 11, 10.0, 0.1) == pytest.approx(0.1)
    assert gdas_tau(0, 1, 10.0, 0.1) == 0.1
    taus = [gdas_tau(s, 7, 4.0, 1.0) for s in range(7)]
    assert all(a > b for a, b in zip(taus, taus[1:]))


def test_optimizers_partition_the_parameters() -> None:
    import supernet  # noqa: F401

    model = timm.create_model("test_local_vim_search", img_size=16, num_classes=10)
    arch_ids = {id(p) for p in model.arch_parameters()}
    weight_ids = {id(p) for g in weight_param_groups(model, 0.05) for p in g["params"]}
    arch_group_ids = {id(p) for g in arch_param_groups(model) for p in g["params"]}
    assert arch_group_ids == arch_ids and arch_ids and not weight_ids & arch_ids
    assert weight_ids | arch_ids == {id(p) for p in model.parameters()}
    decayed = [g for g in weight_param_groups(model, 0.05) if g["weight_decay"] > 0][0]["params"]
    assert all(p.ndim > 1 for p in decayed)


def test_darts_end_to_end_with_warmup(tmp_path, monkeypatch, capsys) -> None:
    splits = []
    real_split = search.split_train

    def recording_split(ds, frac, seed):
        out = real_split(ds, frac, seed)
        splits.append(out)
        return out

    monkeypatch.setattr(search, "split_train", recording_split)
    out = _run(tmp_path, epochs=2, arch_warmup_epochs=1, experiment="darts")

    arch_set, weight_set = splits[0]
    assert not set(arch_set.indices) & set(weight_set.indices)
    assert len(arch_set) + len(weight_set) == 256

    run_dir = Path(out["run_dir"])
    assert {"args.yaml", "summary.csv", "last.pt", "best.pt", "arch_probs.jsonl", "tb"} <= set(os.listdir(run_dir))
    lines = _probs(run_dir)
    assert [r["epoch"] for r in lines] == [0, 1]
    assert lines[0]["labels"] == ["blocks.0", "blocks.1"] and len(lines[0]["candidates"]) == 8
    # Warm-up epoch: the arch logits are exactly their initial values; afterwards they move.
    seed_everything(TINY.get("seed", 0))
    fresh, _ = search.build_supernet({**DEFAULTS, **TINY}, 10, 3)
    initial = [torch.softmax(p.detach(), 0).tolist() for p in fresh.arch_parameters()]
    assert lines[0]["probs"] == initial and lines[1]["probs"] != lines[0]["probs"]

    state = load_checkpoint(run_dir / "last.pt", expect_kind="search", expect_model="test_local_vim_search")
    assert state["derived_model_name"] == "test_local_vim" and state["search_space"]["name"] == "localmamba"
    assert set(state["arch_logits"]) == {"blocks.0", "blocks.1"}
    assert {"state_dict", "optimizer", "arch_optimizer", "scheduler", "rng", "config", "model_kwargs"} <= set(state)
    # timm loads the supernet, arch logits included, from the checkpoint as from its own
    loaded = timm.create_model(state["model"], **state["model_kwargs"], checkpoint_path=str(run_dir / "last.pt"))
    assert all(torch.equal(a, state["state_dict"][k]) for k, a in loaded.state_dict().items())
    assert torch.equal(loaded.arch_parameters()[0].detach(), state["arch_logits"]["blocks.0"])
    # The weight optimizer holds no arch parameter: its state covers only weight tensors.
    n_weights = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    assert n_weights == len(list(fresh.weight_parameters()))
    assert sum(len(g["params"]) for g in state["arch_optimizer"]["param_groups"]) == 2
    assert len(out["history"]) == 2 and out["arch_top1"] == out["history"][-1]["arch_top1"]
    assert out["best_arch_top1"] == max(h["arch_top1"] for h in out["history"])
    assert set(out["arch_probs"]) == {"blocks.0", "blocks.1"}

    # The warm-up epoch takes no arch step: its arch_step_loss is absent (an empty cell, no TensorBoard point, left
    # out of the progress line), never a NaN that reads like a non-finite loss; the columns stay the same.
    assert out["history"][0]["arch_step_loss"] is None and out["history"][1]["arch_step_loss"] > 0
    with open(run_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["arch_step_loss"] for r in rows][0] == "" and float(rows[1]["arch_step_loss"]) > 0
    progress = [line for line in capsys.readouterr().out.splitlines() if "] epoch " in line]
    assert len(progress) == 2 and "nan" not in " ".join(progress)
    assert "arch_step_loss" not in progress[0] and "arch_step_loss" in progress[1]
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("epoch/arch_step_loss")] == [1]
    assert [e.step for e in acc.Scalars("epoch/arch_top1")] == [0, 1]


def test_gdas_computes_only_sampled_orders(tmp_path, monkeypatch) -> None:
    widths = []
    real_scan = kernels.selective_scan

    def recording_scan(*args, **kwargs):
        widths.append(kwargs["orders"].shape[0])
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(kernels, "selective_scan", recording_scan)
    out = _run(tmp_path, algo="gdas", gdas_top_m=2, epochs=1, num_samples=128, experiment="gdas")
    assert widths and set(widths) == {2}
    assert out["epochs_run"] == 1 and os.path.isfile(out["checkpoint"])


def test_gdas_temperature_anneals_from_the_end_of_the_arch_warmup(tmp_path, monkeypatch) -> None:
    from supernet.mixer import MultiOrderMixer

    taus = []
    real = MultiOrderMixer.set_arch_mode

    def recording(self, mode, tau=1.0, top_m=1):
        if self is next(iter(recording.first.values()), self):
            taus.append(tau)
        recording.first.setdefault("m", self)
        return real(self, mode, tau=tau, top_m=top_m)

    recording.first = {}
    monkeypatch.setattr(MultiOrderMixer, "set_arch_mode", recording)
    _run(tmp_path, algo="gdas", epochs=2, arch_warmup_epochs=1, num_samples=256, experiment="tau", tau_max=10.0)
    steps = taus[2:]  # after the constructor's and the pre-loop call: one per training step, two equal epochs
    n = len(steps) // 2
    assert n >= 3 and all(t == 10.0 for t in steps[:n])  # warm-up (arch frozen): tau stays at tau_max
    assert steps[n] == 10.0 and steps[-1] == pytest.approx(DEFAULTS["tau_min"])  # first arch step starts at tau_max
    assert all(a > b for a, b in zip(steps[n:], steps[n + 1 :]))


def test_joint_interrupt_and_resume_is_exact(tmp_path) -> None:
    straight = _run(tmp_path, algo="joint", experiment="straight")

    def interrupt(epoch, metrics, path):
        os.kill(os.getpid(), signal.SIGTERM)

    first = _run(tmp_path, algo="joint", experiment="resumed", on_epoch=interrupt)
    assert first["interrupted"]
    resumed = _run(tmp_path, algo="joint", experiment="resumed", resume="auto")
    a = load_checkpoint(Path(straight["run_dir"]) / "last.pt")
    b = load_checkpoint(Path(resumed["run_dir"]) / "last.pt")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert [r["epoch"] for r in _probs(resumed["run_dir"])] == [0, 1]
    with pytest.raises(ValueError, match="already holds checkpoints"):
        _run(tmp_path, algo="joint", experiment="resumed")


def test_bad_requests(tmp_path) -> None:
    with pytest.raises(ValueError, match="has no arch parameters"):
        _run(tmp_path, model="test_vim")
    with pytest.raises(ValueError, match="--algo 'dart' is out of range"):
        _run(tmp_path, algo="dart")


def test_two_process_gloo_keeps_logits_identical(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        __file__,
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any(not torch.allclose(v, torch.zeros_like(v)) for v in r0.values())
    saved = load_checkpoint(tmp_path / "runs" / "ddp" / "last.pt")["arch_logits"]
    assert all(torch.equal(saved[k], r0[k]) for k in r0)


if __name__ == "__main__":  # one rank of the 2-process test above, started by torchrun
    out_dir = Path(sys.argv[1])
    cfg = {**TINY, "num_samples": 128, "batch_size": 16, "epochs": 1, "output": str(out_dir / "runs")}
    result = main({**cfg, "experiment": "ddp"})
    rank = int(os.environ["RANK"])
    torch.save({k: torch.tensor(v) for k, v in result["arch_logits"].items()}, out_dir / f"rank{rank}.pt")


def test_compiled_gdas_search_matches_eager_without_graph_breaks(tmp_path, monkeypatch) -> None:
    """--compile: the supernet runs through dynamo and AOT autograd (the aot_eager backend here: inductor's codegen
    is not what is tested, and is slow on CPU) with no graph break, gdas's changing temperature included, and the
    search ends where the eager one does."""
    from torch._dynamo.utils import counters

    import nas.search as search

    modes = []
    real_compile = torch.compile

    def aot_eager_compile(model, mode=None, options=None):
        modes.append(mode or {k: options[k] for k in ("triton.cudagraphs", "layout_optimization")})
        return real_compile(model, backend="aot_eager")

    kw = dict(algo="gdas", epochs=1, num_samples=128, batch_size=32, seed=3)
    eager = _run(tmp_path, experiment="eager", **kw)
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(search.torch, "compile", aot_eager_compile)
    compiled = _run(tmp_path, experiment="compiled", compile="reduce-overhead", **kw)
    # reduce-overhead's options, with Inductor's layout optimization off (supernet.compile_model)
    assert modes == [{"triton.cudagraphs": True, "layout_optimization": False}]
    # one training graph: the temperature is a device tensor the graph reads, so its changes recompile nothing (as a
    # Python float it recompiled once, then was a graph input that CUDA-graph trees recorded per value); evaluation
    # runs the uncompiled model
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    a = load_checkpoint(Path(eager["run_dir"]) / "last.pt")["state_dict"]
    b = load_checkpoint(Path(compiled["run_dir"]) / "last.pt")["state_dict"]
    assert a.keys() == b.keys()  # no _orig_mod. prefixes
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    with pytest.raises(ValueError, match="--compile 'fast' is out of range"):
        _run(tmp_path, compile="fast")


def test_a_torn_arch_probs_line_does_not_stop_a_resume(tmp_path) -> None:
    """A kill during an append can leave a partial last line: the resume drops it (with a warning) and rewrites the
    epochs from where it goes on."""
    from nas.search import _truncate_jsonl

    path = tmp_path / "arch_probs.jsonl"
    path.write_text('{"epoch": 0, "probs": []}\n{"epoch": 1, "probs": []}\n5\n{"epoch": 2, "pro\n')
    with pytest.warns(UserWarning, match=r"line 3 is not an epoch record"):
        _truncate_jsonl(path, 2)
    assert path.read_text() == '{"epoch": 0, "probs": []}\n{"epoch": 1, "probs": []}\n'
