"""A resume compares the model's constructor arguments as the model resolved them, defaults included.

A run started without ``--model-kwargs`` and resumed with a model default passed explicitly (or the reverse) builds
the same model: the resume is accepted. A real change (another ``d_state``) is still refused with one line naming the
argument, its saved and its asked value, and leaves the run as it was. Checkpoints without the resolved arguments
(older ones, timm's own models) compare the passed arguments as before.

The runs are real ``retrain.train`` / ``nas.search`` command lines (``run_cli``, in process) on tiny models: the first
stops after its first epoch's checkpoint, the resumes continue it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import timm
import torch.nn as nn

import nas.search as search
import retrain.train as train
import supernet  # noqa: F401  (registers our models with timm)
from retrain.checkpoint import CheckpointError, check_resume_spec, load_checkpoint, resolved_model_args
from retrain.config import run_cli

TRAIN = ["--model", "test_vim", "--img-size", "16", "--num-samples", "32", "--batch-size", "16", "--epochs", "2"]
TRAIN += ["--warmup-epochs", "0", "--device", "cpu", "--log-interval", "1000"]
SEARCH = ["--model", "test_local_vim_search", "--img-size", "16", "--num-samples", "64", "--batch-size", "16"]
SEARCH += ["--epochs", "2", "--warmup-epochs", "0", "--arch-warmup-epochs", "0", "--device", "cpu"]
SEARCH += ["--log-interval", "1000"]
TRAINERS = {"retrain": (train, TRAIN, "test_vim"), "search": (search, SEARCH, "test_local_vim_search")}


class _StopAfterFirstEpoch(Exception):
    """Ends a run right after its first epoch's checkpoint (a run cut short, to be resumed)."""


def _stop(epoch: int, metrics: dict, path: Path) -> None:
    raise _StopAfterFirstEpoch


def _default(model: str, arg: str):
    return timm.create_model(model).init_args[arg]


@pytest.mark.parametrize("explicit_at", ["resume", "start"])
@pytest.mark.parametrize("which", list(TRAINERS))
def test_a_default_passed_explicitly_resumes_and_a_real_change_is_refused(tmp_path, capsys, which, explicit_at):
    module, args, model = TRAINERS[which]
    d_state = _default(model, "d_state")
    assert d_state != 3
    explicit = ["--model-kwargs", f"d_state={d_state}"]
    run = [*args, "--output", str(tmp_path), "--experiment", "run"]
    first, resumed = (explicit, []) if explicit_at == "start" else ([], explicit)

    with pytest.raises(_StopAfterFirstEpoch):
        run_cli(functools.partial(module.main, on_epoch=_stop), module.DEFAULTS, [*run, *first])
    last = tmp_path / "run" / "last.pt"
    state = load_checkpoint(last)
    assert state["next_epoch"] == 1
    saved = state["model_spec"]
    assert ("d_state" in saved["kwargs"]) == (explicit_at == "start")  # the passed arguments are kept as passed
    assert saved["resolved_kwargs"]["d_state"] == d_state
    assert "model_name" not in saved["resolved_kwargs"] and "arch" not in saved["resolved_kwargs"]

    # A real change: one line naming the argument with the saved and the asked value; the run is left as it was.
    before = last.read_bytes()
    capsys.readouterr()
    assert run_cli(module.main, module.DEFAULTS, [*run, "--resume", "auto", "--model-kwargs", "d_state=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # "resume auto: using ..." first, then the error
    assert [line for line in err if line.startswith("error: ")] == err[-1:] and "Traceback" not in "".join(err), err
    assert f"was built with d_state={d_state}, but this run asks for d_state=3; resume with the run's own" in err[-1]
    assert last.read_bytes() == before

    # The same model, its default named on one side only: accepted, and the run continues to its end.
    code = run_cli(module.main, module.DEFAULTS, [*run, "--resume", "auto", *resumed])
    err = capsys.readouterr().err
    assert code == 0 and f"resumed {last} at epoch 1" in err, err
    end = load_checkpoint(last)
    assert end["next_epoch"] == 2 and end["step"] == 2 * state["step"]


# --------------------------------------------------------------------------------------------------------------------
# check_resume_spec and resolved_model_args on their own


def _spec(kwargs: dict, resolved: dict | None = None) -> dict:
    spec = {"name": "test_vim", "kwargs": kwargs, "arch": None}
    if resolved is not None:
        spec["resolved_kwargs"] = resolved
    return spec


BASE = {"num_classes": 10, "in_chans": 3, "img_size": 16}


@pytest.fixture(scope="module")
def resolved() -> dict:
    return resolved_model_args(timm.create_model("test_vim", **BASE))


def test_an_old_checkpoint_without_resolved_args_compares_the_passed_args(tmp_path, resolved) -> None:
    old = {"model_spec": _spec(dict(BASE))}  # written before the resolved arguments were saved
    check_resume_spec(old, _spec(dict(BASE), resolved), tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"built with d_state=\(unset\), but this run asks for d_state=4; resume"):
        check_resume_spec(old, _spec({**BASE, "d_state": 4}, resolved), tmp_path / "last.pt")
    # This run lacking them (a model without init_args) compares the passed arguments too.
    new = {"model_spec": _spec({**BASE, "d_state": 4}, resolved)}
    with pytest.raises(CheckpointError, match=r"built with d_state=4, but this run asks for d_state=\(unset\)"):
        check_resume_spec(new, _spec(dict(BASE)), tmp_path / "last.pt")


def test_resolved_args_decide_where_both_sides_have_them(tmp_path, resolved) -> None:
    path = tmp_path / "last.pt"
    state = {"model_spec": _spec(dict(BASE), resolved)}
    check_resume_spec(state, _spec({**BASE, "d_state": 4, "img_size": [16, 16]}, resolved), path)
    other = {**resolved, "d_state": 8}
    with pytest.raises(CheckpointError, match=r"built with d_state=4, but this run asks for d_state=8; resume") as e:
        check_resume_spec(state, _spec({**BASE, "d_state": 8}, other), path)
    assert "\n" not in str(e.value)
    # An argument only one side's model code knows compares as passed: unpassed, it is no change.
    newer = {**resolved, "new_arg": 1.0}
    check_resume_spec(state, _spec(dict(BASE), newer), path)
    with pytest.raises(CheckpointError, match=r"built with new_arg=\(unset\), but this run asks for new_arg=2.0"):
        check_resume_spec(state, _spec({**BASE, "new_arg": 2.0}, newer), path)


def test_resolved_model_args_are_plain_and_leave_out_what_is_compared_elsewhere(resolved) -> None:
    assert resolved_model_args(nn.Linear(2, 2)) is None  # timm's own models record no init_args
    assert resolved["img_size"] == [16, 16] and resolved["d_state"] == 4 and resolved["orders"] == ["h", "h_flip"]
    assert "model_name" not in resolved and "arch" not in resolved
    sup = timm.create_model("test_local_vim_search", space="localmamba")
    space = resolved_model_args(sup)["space"]
    assert space == sup.search_space.to_dict() and space["name"] == "localmamba"


def _arch(*orders: list[str]) -> dict:
    return {"layers": [{"label": f"blocks.{i}", "orders": o} for i, o in enumerate(orders)]}


def test_another_arch_names_the_first_layer_that_differs(tmp_path) -> None:
    path = tmp_path / "last.pt"
    state = {"model_spec": {**_spec(dict(BASE)), "arch": _arch(["h", "v"], ["h", "v"], ["h", "v"])}}
    check_resume_spec(state, {**_spec(dict(BASE)), "arch": _arch(["h", "v"], ["h", "v"], ["h", "v"])}, path)
    asked = {**_spec(dict(BASE)), "arch": _arch(["h", "v"], ["h", "w2"], ["v", "w2"])}
    with pytest.raises(CheckpointError) as e:
        check_resume_spec(state, asked, path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (
        f"checkpoint {path.resolve()} was built with another arch (saved vs asked: arch layer blocks.1 orders [h, v] "
        f"vs [h, w2] (and 1 more layer)); resume with the run's own settings (its args.yaml) or start a new "
        f"--experiment"
    )
    # With other arguments too; an arch against none; another number of layers.
    with pytest.raises(CheckpointError, match=r"asks for d_state=8 and another arch \(saved vs asked: arch layer "):
        check_resume_spec(state, {**asked, "kwargs": {**BASE, "d_state": 8}}, path)
    with pytest.raises(CheckpointError, match=r"arch an arch file's orders vs none \(the model's own orders\)\)"):
        check_resume_spec(state, _spec(dict(BASE)), path)
    with pytest.raises(CheckpointError, match=r"arch of 3 layers vs 2 layers\)"):
        check_resume_spec(state, {**asked, "arch": _arch(["h", "v"], ["h", "v"])}, path)


def test_scan_backend_and_recompute_are_not_compared(tmp_path, resolved) -> None:
    """They pick how the same math runs (which implementation, recompute or keep chunk states), not what is saved."""
    path = tmp_path / "last.pt"
    assert {"scan_backend", "scan_recompute"} <= set(resolved)
    asked = {**BASE, "scan_backend": "ref", "scan_recompute": True}
    resolved_asked = {**resolved, "scan_backend": "ref", "scan_recompute": True}
    check_resume_spec({"model_spec": _spec(dict(BASE), resolved)}, _spec(asked, resolved_asked), path)  # resolved
    check_resume_spec({"model_spec": _spec(dict(BASE))}, _spec(asked), path)  # as passed (an older checkpoint)
    check_resume_spec({"model_spec": _spec(asked, resolved_asked)}, _spec(dict(BASE), resolved), path)
    with pytest.raises(CheckpointError, match=r"built with d_state=4, but this run asks for d_state=8; resume"):
        check_resume_spec(
            {"model_spec": _spec(dict(BASE), resolved)},
            _spec({**asked, "d_state": 8}, {**resolved_asked, "d_state": 8}),
            path,
        )


def test_dt_rank_auto_and_the_integer_it_resolves_to_are_the_same_model(tmp_path, capsys) -> None:
    """The plain family's dt_rank "auto" resolves to one integer for every layer: a run started with "auto" resumes
    with that integer passed explicitly, and another integer is refused naming it."""
    rank = resolved_model_args(timm.create_model("test_vim", img_size=16))["dt_rank"]
    assert isinstance(rank, int) and _default("test_vim", "dt_rank") == "auto"
    run = [*TRAIN, "--output", str(tmp_path), "--experiment", "run"]
    with pytest.raises(_StopAfterFirstEpoch):
        run_cli(functools.partial(train.main, on_epoch=_stop), train.DEFAULTS, run)
    last = tmp_path / "run" / "last.pt"
    assert load_checkpoint(last)["model_spec"]["resolved_kwargs"]["dt_rank"] == rank
    capsys.readouterr()
    assert run_cli(train.main, train.DEFAULTS, [*run, "--resume", "auto", "--model-kwargs", f"dt_rank={rank + 1}"]) == 2
    assert f"was built with dt_rank={rank}, but this run asks for dt_rank={rank + 1}" in capsys.readouterr().err
    assert run_cli(train.main, train.DEFAULTS, [*run, "--resume", "auto", "--model-kwargs", f"dt_rank={rank}"]) == 0


def test_a_checkpoint_that_kept_dt_rank_auto_compares_by_its_weights(tmp_path) -> None:
    """Checkpoints written before dt_rank was resolved hold "auto": the rank their dt_proj weights have decides."""
    model = timm.create_model("test_vim", **BASE)
    new = resolved_model_args(model)
    rank = new["dt_rank"]
    state = {"model_spec": _spec(dict(BASE), {**new, "dt_rank": "auto"}), "state_dict": model.state_dict()}
    check_resume_spec(state, _spec(dict(BASE), new), tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=rf"built with dt_rank=auto, but this run asks for dt_rank={rank + 1}"):
        check_resume_spec(state, _spec(dict(BASE), {**new, "dt_rank": rank + 1}), tmp_path / "last.pt")
    # hierarchical models resolve "auto" per stage, to several ranks: it stays "auto"
    assert resolved_model_args(timm.create_model("vmamba_tiny"))["dt_rank"] == "auto"
