"""Atomic checkpoints, one-line refusals, resume auto, and top-k keeping."""

from __future__ import annotations

import os
import random
import time

import numpy as np
import pytest
import torch

from retrain.checkpoint import CheckpointError, CheckpointKeeper, load_checkpoint, resolve_resume, save_checkpoint
from retrain.engine import rng_state, set_rng_state


def _state(epoch: int = 0, model: str = "test_vim") -> dict:
    return {"kind": "retrain", "model": model, "epoch": epoch, "step": 10 * epoch, "w": torch.arange(4.0) + epoch}


def test_roundtrip_atomic(tmp_path) -> None:
    path = save_checkpoint(_state(1), tmp_path / "last.pt")
    assert not (tmp_path / "last.pt.tmp").exists()
    state = load_checkpoint(path, expect_kind="retrain", expect_model="test_vim")
    assert state["complete"] is True and torch.equal(state["w"], torch.arange(4.0) + 1)


def test_earlier_weight_keys_load_under_timms_names(tmp_path) -> None:
    """Checkpoints of earlier versions kept the weights as model_state / ema; they load as state_dict /
    state_dict_ema, the keys the trainers write now (and timm's loaders read)."""
    w, e = {"a": torch.arange(3.0)}, {"a": torch.ones(3)}
    path = save_checkpoint({**_state(), "model_state": w, "ema": e}, tmp_path / "old.pt")
    state = load_checkpoint(path)
    assert "model_state" not in state and "ema" not in state
    assert torch.equal(state["state_dict"]["a"], w["a"]) and torch.equal(state["state_dict_ema"]["a"], e["a"])
    both = save_checkpoint({**_state(), "model_state": w, "state_dict": e}, tmp_path / "both.pt")
    assert torch.equal(load_checkpoint(both)["state_dict"]["a"], e["a"])  # a present new key wins


def test_rng_state_survives_weights_only(tmp_path) -> None:
    torch.manual_seed(0)
    save_checkpoint({**_state(), "rng": rng_state()}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.rand(2).tolist(), random.random())
    torch.manual_seed(123)
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (torch.rand(3), np.random.rand(2).tolist(), random.random())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


@pytest.mark.parametrize("case", ["missing", "truncated", "foreign", "other_model", "other_kind", "pickled"])
def test_refusals_are_one_line(tmp_path, case) -> None:
    path = tmp_path / "c.pt"
    kwargs = {}
    if case == "truncated":
        save_checkpoint(_state(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        match = "truncated"
    elif case == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
        match = "not a scan-nas checkpoint"
    elif case == "other_model":
        save_checkpoint(_state(model="vim_tiny"), path)
        kwargs, match = {"expect_model": "test_vim"}, "holds model 'vim_tiny', not 'test_vim'"
    elif case == "other_kind":
        save_checkpoint(_state(), path)
        kwargs, match = {"expect_kind": "search"}, "expected 'search'"
    elif case == "pickled":
        torch.save({"format": "scan-nas-checkpoint-v1", "obj": object()}, path)
        match = "not a plain-tensor checkpoint"
    else:
        match = "checkpoint not found"
    with pytest.raises(CheckpointError, match=match) as exc:
        load_checkpoint(path, **kwargs)
    assert "\n" not in str(exc.value)


def test_resume_auto_picks_newest_complete(tmp_path, capsys) -> None:
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # empty run dir: start from scratch, and say so
    assert "starting from scratch" in capsys.readouterr().err
    save_checkpoint(_state(1), tmp_path / "checkpoint-1.pt")
    save_checkpoint(_state(2), tmp_path / "last.pt")
    time.sleep(0.01)
    save_checkpoint(_state(3), tmp_path / "checkpoint-3.pt")
    # The newest one is truncated (a crash mid-write without the rename would leave only .tmp; simulate worse).
    data = (tmp_path / "checkpoint-3.pt").read_bytes()
    (tmp_path / "checkpoint-3.pt").write_bytes(data[:100])
    (tmp_path / "last.pt.tmp").write_bytes(b"partial")
    assert resolve_resume("auto", tmp_path) == tmp_path / "last.pt"
    assert "using" in capsys.readouterr().err
    os.remove(tmp_path / "last.pt")
    os.remove(tmp_path / "checkpoint-1.pt")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_resume("auto", tmp_path)


def test_keeper_top_k(tmp_path) -> None:
    keeper = CheckpointKeeper(tmp_path, max_history=2)
    for epoch, metric in enumerate([10.0, 30.0, 20.0, 5.0, 40.0]):
        keeper.save(_state(epoch), epoch, metric)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["best.pt", "checkpoint-1.pt", "checkpoint-4.pt", "last.pt"]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 4
    last = load_checkpoint(tmp_path / "last.pt")
    again = CheckpointKeeper(tmp_path, max_history=2)
    again.load_state_dict(last["keeper"])
    assert again.best_metric == 40.0 and sorted(e for _, e in again.history) == [1, 4]


def test_keeper_writes_last_pt_last(tmp_path, monkeypatch) -> None:
    """``last.pt`` is the commit point: in every save each file is fsynced before its rename, ``last.pt`` is renamed
    after the per-epoch and best files, and a per-epoch file that fell out of the top k is deleted only after it."""
    import pathlib

    import retrain.checkpoint as ckpt

    events: list[tuple[str, str]] = []
    synced: set[int] = set()  # inodes fsynced so far
    real_replace, real_fsync, real_unlink = os.replace, os.fsync, pathlib.Path.unlink

    def replace(src, dst):
        assert os.stat(src).st_ino in synced, f"{dst} renamed into place before its data was fsynced"
        events.append(("replace", os.path.basename(dst)))
        return real_replace(src, dst)

    def fsync(fd):
        synced.add(os.fstat(fd).st_ino)
        return real_fsync(fd)

    def unlink(self, *args, **kwargs):
        events.append(("unlink", self.name))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    keeper = CheckpointKeeper(tmp_path, max_history=1)
    per_save = []
    for epoch, metric in enumerate([10.0, 30.0, 20.0, 40.0]):
        events.clear()
        keeper.save(_state(epoch), epoch, metric)
        per_save.append(list(events))
    for events_of_save in per_save:
        replaced = [name for kind, name in events_of_save if kind == "replace"]
        assert replaced[-1] == "last.pt" and replaced.count("last.pt") == 1
        last_at = events_of_save.index(("replace", "last.pt"))
        assert all(kind != "unlink" for kind, _ in events_of_save[:last_at])
    # epoch 1 beat epoch 0: checkpoint-1 and best before last, checkpoint-0 deleted after it
    assert per_save[1] == [
        ("replace", "checkpoint-1.pt"),
        ("replace", "best.pt"),
        ("replace", "last.pt"),
        ("unlink", "checkpoint-0.pt"),
    ]
    assert per_save[2] == [("replace", "last.pt")]
