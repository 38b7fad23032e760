"""Non-finite losses and gradients: skipped and counted, rolled back after N in a row, stopped after M in all.

NaNs are injected with the test hooks ``debug_nan_loss_at`` / ``debug_nan_grad_at`` (the checks with these indices
get a NaN loss / a NaN gradient while the loss stays finite).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import nas.search as search
import retrain.train as train
from retrain.checkpoint import load_checkpoint
from retrain.config import run_cli
from retrain.engine import DivergedError

TRAIN = {
    "model": "test_vim",
    "img_size": 16,
    "num_samples": 128,
    "batch_size": 16,
    "epochs": 2,
    "warmup_epochs": 0,
    "lr": 3e-3,
    "log_interval": 1000,
    "device": "cpu",
}  # 8 steps per epoch
SEARCH = {
    "model": "test_local_vim_search",
    "algo": "joint",
    "img_size": 16,
    "num_samples": 128,
    "batch_size": 16,
    "epochs": 1,
    "warmup_epochs": 0,
    "arch_warmup_epochs": 0,
    "arch_lr": 3e-2,
    "log_interval": 1000,
    "device": "cpu",
}  # 4 steps per epoch


def _scalars(run_dir: str | Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(Path(run_dir) / "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_bad_loss_and_bad_gradient_are_skipped_counted_and_logged(tmp_path, capsys) -> None:
    out = train.main(
        {**TRAIN, "output": str(tmp_path), "experiment": "skip", "debug_nan_loss_at": [2], "debug_nan_grad_at": [9]}
    )
    err = capsys.readouterr().err
    assert out["bad_steps"] == 2 and out["rollbacks"] == 0 and out["epochs_run"] == 2
    assert "step 2: non-finite loss or gradient, skipped" in err and "step 8: non-finite" in err
    state = load_checkpoint(Path(out["run_dir"]) / "last.pt")
    assert state["step"] == 16 - 2 and state["bad_steps"] == 2
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert _scalars(out["run_dir"], "train/bad_steps") == [(2, 1.0), (8, 2.0)]
    assert [v for _, v in _scalars(out["run_dir"], "epoch/bad_steps")] == [1.0, 2.0]


def test_n_in_a_row_roll_back_to_the_last_checkpoint(tmp_path, capsys) -> None:
    # Checks 0-4 step (checkpoints at steps 2 and 4), checks 5-7 are bad: the third rolls back to step 4's weights.
    cfg = {**TRAIN, "output": str(tmp_path), "checkpoint_interval": 2, "rollback_after": 3}
    out = train.main({**cfg, "experiment": "rollback", "debug_nan_loss_at": [5, 6, 7]})
    err = capsys.readouterr().err
    assert out["rollbacks"] == 1 and out["bad_steps"] == 3
    assert "step 5: 3 bad steps in a row; rolled back to step 4" in err
    assert load_checkpoint(Path(out["run_dir"]) / "last.pt")["step"] == 16 - 3 - 1  # step 5's update is undone
    assert _scalars(out["run_dir"], "train/rollbacks") == [(4, 1.0)]


@pytest.mark.parametrize("which", ["train", "search"])
def test_a_rollback_restores_weights_and_optimizer_state(tmp_path, which) -> None:
    """A rollback puts back what the checkpoint holds, not only its step count. Run A takes checks 0-4 (a checkpoint
    at step 4) and rolls back after bad checks 5-7, undoing check 4's update; run B skips checks 4-7 and never rolls
    back. Both go on from step 4's state with the same batches, so they end bit-identical (EMA and arch logits
    included); a rollback that restored less, or nothing, would leave check 4's update in A."""
    main, base = (train.main, TRAIN) if which == "train" else (search.main, {**SEARCH, "epochs": 3})
    cfg = {**base, "output": str(tmp_path), "checkpoint_interval": 2}
    if which == "train":
        cfg["model_ema"] = True
    a = main({**cfg, "experiment": "rolled", "rollback_after": 3, "debug_nan_loss_at": [5, 6, 7]})
    b = main({**cfg, "experiment": "skipped", "rollback_after": 0, "debug_nan_loss_at": [4, 5, 6, 7]})
    assert a["rollbacks"] == 1 and b["rollbacks"] == 0
    sa, sb = (load_checkpoint(Path(out["run_dir"]) / "last.pt") for out in (a, b))
    assert sa["step"] == sb["step"]
    keys = [k for k in ("state_dict", "state_dict_ema", "arch_logits") if sa.get(k) is not None]
    assert "state_dict_ema" in keys or "arch_logits" in keys
    for key in keys:
        assert sa[key].keys() == sb[key].keys()
        for name in sa[key]:
            assert torch.equal(sa[key][name], sb[key][name]), f"{key}.{name}"
    for opt in ("optimizer", "arch_optimizer")[: 1 + (which == "search")]:
        state = sa[opt]["state"]
        assert state and all(torch.equal(state[i]["exp_avg"], sb[opt]["state"][i]["exp_avg"]) for i in state), opt


def test_m_bad_steps_stop_with_one_line_naming_the_step(tmp_path, capsys) -> None:
    cfg = {**TRAIN, "output": str(tmp_path), "max_bad_steps": 4, "rollback_after": 0}
    with pytest.raises(DivergedError, match=r"stopped at step 3: 4 non-finite .* fp32 .* lower --lr"):
        train.main({**cfg, "experiment": "stop", "debug_nan_grad_at": list(range(3, 100))})
    argv = ["--output", str(tmp_path), "--experiment", "stop-cli", "--max-bad-steps", "2", "--debug-nan-loss-at", "0"]
    argv += ["1", *[f"--{k.replace('_', '-')}={v}" for k, v in TRAIN.items()]]
    capsys.readouterr()
    assert run_cli(train.main, train.DEFAULTS, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: stopped at step 0: 2 non-finite") and "Traceback" not in "".join(err)


def test_search_skips_a_bad_gradient_on_both_optimizers(tmp_path, capsys) -> None:
    base = search.main({**SEARCH, "output": str(tmp_path), "experiment": "clean"})
    out = search.main({**SEARCH, "output": str(tmp_path), "experiment": "nan", "debug_nan_grad_at": [1]})
    assert out["bad_steps"] == 1 and base["bad_steps"] == 0
    a = load_checkpoint(Path(base["run_dir"]) / "last.pt")
    b = load_checkpoint(Path(out["run_dir"]) / "last.pt")
    assert b["step"] == a["step"] - 1
    assert all(torch.isfinite(v).all() for v in b["arch_logits"].values())
    # The skipped step moved neither optimizer: its Adam step counts are one behind the clean run's.
    assert b["arch_optimizer"]["state"][0]["step"] == a["arch_optimizer"]["state"][0]["step"] - 1
    with pytest.raises(DivergedError, match="lower --lr / --arch-lr"):
        search.main(
            {**SEARCH, "output": str(tmp_path), "experiment": "stop", "max_bad_steps": 1, "debug_nan_loss_at": [0]}
        )
