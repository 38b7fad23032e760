"""Derivation: top-k per layer under the space's constraint, the arch file, plots, determinism, one-line errors."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from nas import vis_search_prob as vsp
from search_spaces import load_arch, load_space


def _fake_run(
    tmp_path: Path, space: str = "localmamba", epochs: int = 3, depth: int = 3, uniform: bool = False
) -> Path:
    """A search run directory with only ``arch_probs.jsonl`` and ``args.yaml`` (what a search writes per epoch).

    ``uniform``: every epoch's probabilities are 1/K, as a search that never took an arch step records them.
    """
    sp = load_space(space)
    run = tmp_path / "run"
    run.mkdir()
    n = sp.num_candidates
    lines = []
    for e in range(epochs):
        probs = []
        for layer in range(depth):
            # Windowed orders win more and more, so the constraint (if any) must pull a global order back in.
            raw = [1.0 + (e + 1) * (2.0 if not sp.global_mask[j] else 0.1) * ((j + layer) % n + 1) for j in range(n)]
            raw = [1.0] * n if uniform else raw
            s = sum(raw)
            probs.append([r / s for r in raw])
        lines.append(
            json.dumps(
                {
                    "epoch": e,
                    "labels": [f"blocks.{i}" for i in range(depth)],
                    "candidates": list(sp.candidates),
                    "probs": probs,
                }
            )
        )
    (run / "arch_probs.jsonl").write_text("\n".join(lines) + "\n")
    (run / "args.yaml").write_text(yaml.safe_dump({"search_space": space, "dataset": "synthetic"}))
    return run


def test_derive_from_jsonl_writes_arch_plots_and_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _fake_run(tmp_path, "extended")
    out = vsp.main({"source": str(run)})
    arch = load_arch(out["arch_path"])
    space = load_space("extended")
    assert arch.space.candidates == space.candidates and arch.depth == 3
    for layer in arch.layers:
        assert len(layer.orders) == space.k
        assert sum(space.global_mask[space.index(o)] for o in layer.orders) >= space.min_global
        assert list(layer.orders) == sorted(layer.orders, key=space.index)
    assert arch.provenance["checkpoint"] == "arch_probs.jsonl" and arch.provenance["epoch"] == 2
    assert Path(out["heatmap"]).stat().st_size > 1000 and Path(out["trajectory"]).stat().st_size > 1000
    captured = capsys.readouterr()
    text = captured.out
    assert "blocks.2" in text and "retrain.train --arch" in text and text.rstrip().endswith(out["command"])
    assert out["arch_moved"] and "warning" not in captured.err


def test_constraint_pulls_in_a_global_order(tmp_path: Path) -> None:
    # Every window beats every global order here, yet min_global=1 must keep one.
    run = _fake_run(tmp_path, "extended")
    arch = vsp.main({"source": str(run / "arch_probs.jsonl"), "quiet": True, "plots": False})["arch"]
    space = load_space("extended")
    for layer in arch.layers:
        top = sorted(range(space.num_candidates), key=lambda i: -layer.probs[i])[: space.k]
        assert all(not space.global_mask[i] for i in top)  # unconstrained top-k would hold no global order
        assert sum(space.global_mask[space.index(o)] for o in layer.orders) == 1


def test_k_override_and_range(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    arch = vsp.main({"source": str(run), "k": 2, "quiet": True, "plots": False})["arch"]
    assert all(len(layer.orders) == 2 for layer in arch.layers) and arch.space.k == 2
    with pytest.raises(ValueError, match=r"--k 9 is out of range .* use 1\.\.8"):
        vsp.main({"source": str(run), "k": 9, "out": str(tmp_path / "a.yaml"), "quiet": True})


def test_deterministic_and_refuses_to_overwrite(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    first = vsp.main({"source": str(run), "out": str(tmp_path / "a.yaml"), "quiet": True})
    second = vsp.main({"source": str(run), "out": str(tmp_path / "b.yaml"), "quiet": True})
    assert Path(first["arch_path"]).read_text() == Path(second["arch_path"]).read_text()
    with pytest.raises(ValueError, match="a.yaml, .*a_heatmap.png, .*a_trajectory.png exist; choose another --out or"):
        vsp.main({"source": str(run), "out": str(tmp_path / "a.yaml"), "quiet": True})
    vsp.main({"source": str(run), "out": str(tmp_path / "a.yaml"), "overwrite": True, "quiet": True})


@pytest.mark.parametrize("name", ["y.yaml", "y_heatmap.png", "y_trajectory.png"])
def test_refuses_to_replace_any_file_it_writes(tmp_path: Path, capsys: pytest.CaptureFixture, name: str) -> None:
    """A file the user already has, whichever of the three it is, stops the run before anything is written."""
    run = _fake_run(tmp_path)
    (tmp_path / name).write_text("USERDATA")
    assert vsp.cli([str(run), "--out", str(tmp_path / "y.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {(tmp_path / name).resolve()} exists; choose another --out or pass --overwrite"
    assert (tmp_path / name).read_text() == "USERDATA"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", name])  # nothing else written either
    out = vsp.main({"source": str(run), "out": str(tmp_path / "y.yaml"), "overwrite": True, "quiet": True})
    assert Path(out["heatmap"]).stat().st_size > 1000 and Path(out["trajectory"]).stat().st_size > 1000
    assert load_arch(out["arch_path"]).depth == 3


@pytest.mark.parametrize("name", ["arch_probs.jsonl", "args.yaml", "summary.csv", "last.pt", "mine.pt"])
def test_never_writes_over_the_search_runs_own_files(tmp_path: Path, capsys: pytest.CaptureFixture, name: str) -> None:
    """--out naming the input, a checkpoint or another file of the search run is refused even with --overwrite."""
    run = _fake_run(tmp_path)
    if name.endswith(".pt") or name == "summary.csv":
        (run / name).write_bytes(b"THE RUN'S")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert vsp.cli([str(run / "arch_probs.jsonl"), "--out", str(run / name), "--overwrite", "--no-plots"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {(run / name).resolve()} is one of the search run's files; choose another --out")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_no_plots_writes_and_checks_only_the_arch_file(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    (tmp_path / "y_heatmap.png").write_text("USERDATA")  # not written with plots off, so no reason to refuse
    out = vsp.main({"source": str(run), "out": str(tmp_path / "y.yaml"), "plots": False, "quiet": True})
    assert out["heatmap"] is None and (tmp_path / "y_heatmap.png").read_text() == "USERDATA"


def test_uniform_probabilities_warn_that_the_arch_is_no_search_result(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = _fake_run(tmp_path, uniform=True)
    out = vsp.main({"source": str(run), "quiet": True, "plots": False})
    err = capsys.readouterr().err
    assert not out["arch_moved"] and load_arch(out["arch_path"]).depth == 3  # still written, with the warning
    assert err.startswith("warning: the arch logits never moved from their initial values") and err.count("\n") == 1
    assert "not a search result" in err and "--arch-warmup-epochs" in err


class _Foreign:
    """A pickled object: what weights-only loading refuses with a message of several paragraphs."""


@pytest.mark.parametrize(
    "setup,argv_extra,match",
    [
        ("missing", [], "not found: "),
        ("empty_dir", [], "holds neither a search checkpoint"),
        ("corrupt", [], "truncated or corrupt"),
        (
            "truncated",
            [],
            "is truncated or corrupt (RuntimeError: PytorchStreamReader failed reading zip archive: "
            "failed finding central directory); derive from another ",
        ),
        ("pickled", [], "is truncated or corrupt (UnpicklingError: Weights only load failed); no other checkpoint"),
        ("ok", ["--k", "0"], "--k 0 is out of range"),
        (
            "jsonl_not_object",
            [],
            "arch_probs.jsonl: line 2 is a JSON number, not a record; each line must be an object with epoch, labels, ",
        ),
        ("jsonl_not_lists", [], "arch_probs.jsonl: line 1: labels, candidates and probs must be lists"),
        ("summary_csv", [], "summary.csv is not a search checkpoint; give a search run directory, e.g. "),
        ("arch_yaml", [], "arch.yaml is not a search checkpoint; give a search run directory, e.g. "),
    ],
)
def test_cli_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, setup: str, argv_extra: list[str], match: str
) -> None:
    if setup == "missing":
        source = tmp_path / "nope"
    elif setup == "empty_dir":
        source = tmp_path / "empty"
        source.mkdir()
    elif setup == "corrupt":
        source = tmp_path / "run" / "last.pt"
        source.parent.mkdir()
        source.write_bytes(b"not a checkpoint at all")
    elif setup == "truncated":  # a checkpoint cut short, beside the run's arch_probs.jsonl
        import torch

        from retrain.checkpoint import save_checkpoint

        source = _fake_run(tmp_path) / "last.pt"
        save_checkpoint({"kind": "search", "model": "m", "w": torch.zeros(4096)}, source)
        source.write_bytes(source.read_bytes()[:2000])
    elif setup == "pickled":
        import torch

        source = tmp_path / "run" / "last.pt"
        source.parent.mkdir()
        torch.save({"kind": "search", "obj": _Foreign()}, source)
    elif setup == "jsonl_not_object":  # valid JSON on every line, but the second is no record
        source = _fake_run(tmp_path) / "arch_probs.jsonl"
        source.write_text(source.read_text().splitlines()[0] + "\n5\n")
    elif setup == "jsonl_not_lists":
        source = _fake_run(tmp_path) / "arch_probs.jsonl"
        source.write_text(json.dumps({"epoch": 0, "labels": 3, "candidates": ["h"], "probs": [[1.0]]}) + "\n")
    elif setup in ("summary_csv", "arch_yaml"):  # another file of the run, given in place of its checkpoint
        run = _fake_run(tmp_path)
        vsp.main({"source": str(run), "quiet": True, "plots": False})
        (run / "summary.csv").write_text("epoch,train_loss\n0,2.3\n")
        source = run / ("summary.csv" if setup == "summary_csv" else "arch.yaml")
    else:
        source = _fake_run(tmp_path)
    assert vsp.cli([str(source), *argv_extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and "\n" not in err
    assert "--resume" not in err  # advice for the trainers, not for this tool
    if setup == "truncated":
        assert err.endswith(f"derive from another file of the run instead: {source.parent / 'arch_probs.jsonl'}")
    if setup in ("corrupt", "pickled"):
        assert err.endswith("no other checkpoint or arch_probs.jsonl is beside it to derive from")
    if setup in ("summary_csv", "arch_yaml"):
        assert err.endswith(f"e.g. {source.parent.resolve()}, its last.pt or best.pt, or its arch_probs.jsonl")


def test_search_without_a_finished_epoch_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A search killed in (or still in) its first epoch has written args.yaml and tb/, nothing to derive from yet."""
    from nas import search
    from retrain.config import resolve_config, save_config

    run = tmp_path / "run"
    (run / "tb").mkdir(parents=True)
    save_config(
        resolve_config(search.DEFAULTS, overrides={"output": str(tmp_path), "experiment": "run"}), run / "args.yaml"
    )
    assert vsp.cli([str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: the search in {run.resolve()} has not finished an epoch yet (no last.pt, best.pt or "
        f"arch_probs.jsonl); wait for its first epoch to end, or, if it was stopped, run its nas.search command "
        f"again with --resume auto"
    )
    assert sorted(p.name for p in run.iterdir()) == ["args.yaml", "tb"]


@pytest.mark.parametrize("out", ["outdir", "outdir/", "missing/"])
def test_out_naming_a_folder_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, out: str
) -> None:
    run = _fake_run(tmp_path)
    (tmp_path / "outdir").mkdir()
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert vsp.cli([str(run), "--out", out, "--overwrite"]) == 2  # --overwrite replaces files, never a folder
    err = capsys.readouterr().err.strip()
    folder = out.rstrip("/")
    assert err.startswith(f"error: --out {out} names a folder; --out names the arch file to write")
    assert err.endswith(f"e.g. --out {Path(folder) / 'arch.yaml'}") and "\n" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no plots, no temporary file
    vsp.main({"source": str(run), "out": f"{folder}/arch.yaml", "quiet": True})  # what the error suggests works
    assert sorted(p.name for p in (tmp_path / folder).iterdir()) == [
        "arch.yaml",
        "arch_heatmap.png",
        "arch_trajectory.png",
    ]


def test_out_in_a_new_folder_creates_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _fake_run(tmp_path)
    out = vsp.main({"source": str(run), "out": str(tmp_path / "new" / "sub" / "a.yaml"), "quiet": True})
    assert load_arch(out["arch_path"]).depth == 3 and Path(out["trajectory"]).stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "new" / "sub").iterdir()) == [
        "a.yaml",
        "a_heatmap.png",
        "a_trajectory.png",
    ]
    umask = os.umask(0o022)
    os.umask(umask)  # the files get open()'s mode under the umask, not their temporary files' private 0600
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "new" / "sub").iterdir()} == {0o666 & ~umask}
    # A file where a folder must go is one line, and nothing is created.
    (tmp_path / "afile").write_text("USERDATA")
    assert vsp.cli([str(run), "--out", str(tmp_path / "afile" / "x" / "a.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {(tmp_path / 'afile').resolve()} is a file, not a folder; choose another --out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "new", "run"]


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--kk", "3"], "error: unknown argument '--kk'; did you mean '--k'?"),
        (["--ou", "x.yaml"], "error: unknown argument '--ou'; did you mean '--out'?"),  # no abbreviations
        (["--no-plot"], "error: unknown argument '--no-plot'; did you mean '--no-plots'?"),
        (["--zzz"], "error: unknown argument '--zzz'; see python -m nas.vis_search_prob --help"),
    ],
)
def test_cli_unknown_flags_name_the_nearest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, argv: list[str], match: str
) -> None:
    run = _fake_run(tmp_path)
    monkeypatch.chdir(tmp_path)  # where a relative --out would land
    with pytest.raises(SystemExit) as exc:
        vsp.cli([str(run), *argv])
    assert exc.value.code == 2 and capsys.readouterr().err == match + "\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["run", "arch_probs.jsonl", "args.yaml"])


def test_retrain_command_carries_grid_model_and_data_and_parses() -> None:
    """The printed command is one retrain.train takes, and it rebuilds the searched family on the searched grid."""
    from nas import search
    from retrain import train
    from retrain.config import resolve_config

    model_kwargs = {"d_state": 2, "norm_layer": "layernorm", "expand": 1.5, "space": "localmamba", "mix": "softmax"}
    overrides = {"patch_size": 2, "drop_path": 0.1, "model_kwargs": model_kwargs, "dataset": "fashion_mnist"}
    overrides.update({"data_dir": "my data/fmnist.npz", "img_size": 28, "in_chans": 1, "num_samples": 64})
    search_cfg = resolve_config(search.DEFAULTS, overrides=overrides)
    command = vsp.retrain_command(Path("run dir/arch.yaml"), search_cfg)
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "retrain.train"]
    cfg = resolve_config(train.DEFAULTS, argv[3:])
    train.check_values(cfg)
    assert cfg["arch"] == "run dir/arch.yaml" and cfg["patch_size"] == 2 and cfg["img_size"] == 28
    assert cfg["dataset"] == "fashion_mnist" and cfg["data_dir"] == "my data/fmnist.npz" and cfg["in_chans"] == 1
    assert cfg["num_samples"] == 64 and cfg["shuffle_max"] == vsp.RETRAIN_SHUFFLE_MAX == 0.1
    # The child's own arguments pass; the supernet's (its arch file replaces them) and the recipe's do not.
    assert cfg["model_kwargs"] == {"d_state": 2, "norm_layer": "layernorm", "expand": 1.5}
    assert cfg["drop_path"] == train.DEFAULTS["drop_path"]
    # Defaults stay off the command line.
    plain = "python -m retrain.train --arch a.yaml --shuffle-max 0.1"
    assert vsp.retrain_command(Path("a.yaml"), dict(search.DEFAULTS)) == plain


@pytest.fixture(scope="module")
def patch2_search(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny real search on an 8x8 token grid (patch 2 at 16 px), and a copy of its arch warm-up checkpoint."""
    from nas import search
    from retrain.config import resolve_config

    tmp = tmp_path_factory.mktemp("patch2")
    overrides = {"model": "test_local_vim_search", "dataset": "synthetic", "num_samples": 64, "img_size": 16}
    overrides.update({"epochs": 2, "batch_size": 16, "arch_warmup_epochs": 1, "warmup_epochs": 0, "log_interval": 1000})
    overrides.update({"patch_size": 2, "drop_path": 0.1, "model_kwargs": {"d_state": 2}})
    cfg = resolve_config(search.DEFAULTS, overrides={**overrides, "output": str(tmp), "experiment": "search"})
    warmup = tmp / "search" / "warmup.pt"  # beside the run's arch_probs.jsonl, whose later epochs did move

    def keep_warmup_checkpoint(epoch: int, metrics: dict[str, Any], ckpt: Path) -> None:
        if epoch == 0:  # epoch 0 is the arch warm-up: no arch step yet
            shutil.copy(ckpt, warmup)

    out = search.main(cfg, on_epoch=keep_warmup_checkpoint)
    return {**out, "warmup": warmup}


def test_retrain_command_of_a_real_search_rebuilds_its_grid(
    patch2_search: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from retrain import train
    from retrain.config import resolve_config
    from retrain.data import DatasetInfo

    derived = vsp.main({"source": patch2_search["run_dir"], "out": str(tmp_path / "arch.yaml"), "quiet": True})
    assert derived["arch_moved"] and "warning" not in capsys.readouterr().err
    cfg = resolve_config(train.DEFAULTS, shlex.split(derived["command"])[3:])
    assert cfg["patch_size"] == 2 and cfg["model_kwargs"] == {"d_state": 2} and cfg["img_size"] == 16
    model, _ = train.build_model(cfg, DatasetInfo(num_classes=10, in_chans=3, img_size=cfg["img_size"]))
    assert model.grid == (8, 8) and model.arch.orders == load_arch(derived["arch_path"]).orders


def test_warmup_checkpoint_warns_that_the_logits_never_moved(
    patch2_search: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = vsp.main({"source": str(patch2_search["warmup"]), "out": str(tmp_path / "a.yaml"), "quiet": True})
    err = capsys.readouterr().err
    assert not out["arch_moved"] and out["epoch"] == 0
    assert err.startswith("warning: the arch logits never moved from their initial values (the checkpoint records no")
    assert err.count("\n") == 1 and "not a search result" in err


@pytest.fixture(scope="module")
def relative_space_search(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny real search given its space as a relative path (as configs/demo/search.yaml gives it), stopped by a
    signal at the first step of its second epoch: best.pt holds epoch 0, last.pt the middle of epoch 1.

    The space has localmamba's candidates with another k and constraint, so a preset matched by candidates would show.
    """
    from nas import search
    from retrain.config import resolve_config

    cwd = tmp_path_factory.mktemp("relspace")
    (cwd / "spaces").mkdir()
    space = {"name": "mine", "candidates": list(load_space("localmamba").candidates), "k": 3, "min_global": 1}
    (cwd / "spaces" / "mine.yaml").write_text(yaml.safe_dump(space))
    overrides = {"model": "test_local_vim_search", "dataset": "synthetic", "num_samples": 64, "img_size": 16}
    overrides.update({"epochs": 2, "batch_size": 16, "arch_warmup_epochs": 0, "warmup_epochs": 0, "log_interval": 1000})
    overrides.update({"space": "spaces/mine.yaml", "output": "runs", "experiment": "search"})

    def stop_after_epoch_0(epoch: int, metrics: dict[str, Any], ckpt: Path) -> None:
        if epoch == 0:  # the search's own signal handling: a checkpoint at the next step, then it returns
            signal.raise_signal(signal.SIGTERM)

    before = os.getcwd()
    os.chdir(cwd)  # the search resolves spaces/mine.yaml here, and nowhere else
    try:
        out = search.main(resolve_config(search.DEFAULTS, overrides=overrides), on_epoch=stop_after_epoch_0)
    finally:
        os.chdir(before)
    assert out["interrupted"]
    return {"cwd": cwd, "run_dir": cwd / "runs" / "search", "space": space}


def test_derives_from_any_directory_with_the_space_the_checkpoint_stores(
    relative_space_search: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = relative_space_search["run_dir"]
    monkeypatch.chdir(tmp_path)  # where the recorded space path, spaces/mine.yaml, does not resolve
    out = vsp.main({"source": str(run / "best.pt"), "out": "a.yaml", "quiet": True})
    arch = load_arch(out["arch_path"])
    assert arch.space.to_dict() == relative_space_search["space"]  # its candidates, k and constraint
    assert all(len(layer.orders) == 3 for layer in arch.layers)
    space = load_space(relative_space_search["space"])
    for layer in arch.layers:
        space.validate_choice(layer.orders, layer.label)


def test_checkpoint_without_a_stored_space_says_where_to_run(
    relative_space_search: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """A checkpoint that stores only the space's path (none of its own) still derives, where that path resolves."""
    from retrain.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(relative_space_search["run_dir"] / "best.pt")
    del state["search_space"]
    old = save_checkpoint(state, tmp_path / "old" / "best.pt")
    monkeypatch.chdir(tmp_path)
    assert vsp.cli([str(old), "--out", "a.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {old}: cannot rebuild test_local_vim_search from the checkpoint (search space file")
    assert err.endswith(
        "the checkpoint stores no usable search space, only its path: run this from the directory the search ran in, "
        "where 'spaces/mine.yaml' resolves"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    monkeypatch.chdir(relative_space_search["cwd"])
    out = vsp.main({"source": str(old), "out": str(tmp_path / "a.yaml"), "quiet": True})
    assert load_arch(out["arch_path"]).space.to_dict() == relative_space_search["space"]


def test_jsonl_alone_with_a_relative_space_says_where_to_run(
    relative_space_search: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """arch_probs.jsonl stores no space: its args.yaml names the path as the search was given it. Copied away from
    the run's checkpoints, nothing else tells the space."""
    run = relative_space_search["run_dir"]
    (tmp_path / "copy").mkdir()
    for name in ("arch_probs.jsonl", "args.yaml"):
        shutil.copy(run / name, tmp_path / "copy" / name)
    jsonl = tmp_path / "copy" / "arch_probs.jsonl"
    monkeypatch.chdir(tmp_path)
    assert vsp.cli([str(jsonl), "--out", "a.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    # Not localmamba, whose candidates these are: it keeps another k and constraint.
    assert err.startswith(f"error: cannot tell the search space of the run: {jsonl.parent / 'args.yaml'} names ")
    assert "names 'spaces/mine.yaml' but search space file not found" in err and "\n" not in err
    assert err.endswith(
        "run this from the directory the search ran in, where 'spaces/mine.yaml' resolves, or pass the run's last.pt "
        "(it stores the space itself)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
    monkeypatch.chdir(relative_space_search["cwd"])
    out = vsp.main({"source": str(jsonl), "out": str(tmp_path / "a.yaml"), "quiet": True})
    assert load_arch(out["arch_path"]).space.to_dict() == relative_space_search["space"]


def test_jsonl_beside_its_checkpoint_derives_from_any_directory(
    relative_space_search: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where args.yaml's relative space path does not resolve, the last.pt beside the jsonl stores the space."""
    jsonl = relative_space_search["run_dir"] / "arch_probs.jsonl"
    monkeypatch.chdir(tmp_path)
    out = vsp.main({"source": str(jsonl), "out": "a.yaml", "quiet": True})
    assert out["source"] == jsonl
    arch = load_arch(out["arch_path"])
    assert arch.space.to_dict() == relative_space_search["space"]  # its k and constraint, not localmamba's
    assert all(len(layer.orders) == 3 for layer in arch.layers)


def test_jsonl_takes_the_stored_space_over_a_same_named_file_here(
    relative_space_search: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """args.yaml's relative path may name another file from here (same candidates, another k): the space stored in
    the last.pt beside the jsonl wins, as when deriving from the run directory."""
    jsonl = relative_space_search["run_dir"] / "arch_probs.jsonl"
    (tmp_path / "spaces").mkdir()
    other = {**relative_space_search["space"], "name": "other", "k": 2, "min_global": 0}
    (tmp_path / "spaces" / "mine.yaml").write_text(yaml.safe_dump(other))
    monkeypatch.chdir(tmp_path)
    from_jsonl = load_arch(vsp.main({"source": str(jsonl), "out": "a.yaml", "quiet": True})["arch_path"])
    from_run = load_arch(vsp.main({"source": str(jsonl.parent), "out": "b.yaml", "quiet": True})["arch_path"])
    assert from_jsonl.space.to_dict() == from_run.space.to_dict() == relative_space_search["space"]
    assert all(len(layer.orders) == 3 for layer in from_jsonl.layers)  # the run's k (the jsonl holds epoch 0's probs)


def test_mid_epoch_checkpoint_is_labelled_partial(
    relative_space_search: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    from retrain.checkpoint import load_checkpoint

    run = relative_space_search["run_dir"]
    monkeypatch.chdir(relative_space_search["cwd"])  # where the search ran
    state = load_checkpoint(run / "last.pt")
    assert (state["epoch"], state["next_epoch"], state["next_batch"]) == (1, 1, 1)  # stopped within epoch 1
    out = vsp.main({"source": str(run / "last.pt"), "out": str(tmp_path / "a.yaml")})
    text = capsys.readouterr().out
    assert f"derived from {run / 'last.pt'} (mid-epoch 1, step {state['step']}), search space 'mine'" in text
    assert load_arch(out["arch_path"]).provenance["mid_epoch_step"] == state["step"]
    # An epoch's end reads as before.
    out = vsp.main({"source": str(run / "best.pt"), "out": str(tmp_path / "b.yaml")})
    assert f"derived from {run / 'best.pt'} (epoch 0), search space 'mine'" in capsys.readouterr().out
    assert "mid_epoch_step" not in load_arch(out["arch_path"]).provenance


def test_tiny_search_checkpoint_derives_a_buildable_arch(tmp_path: Path) -> None:
    """End to end with the real search: its checkpoint -> an arch file the model zoo builds."""
    import supernet
    from nas import search
    from retrain.config import resolve_config

    overrides = {"model": "test_local_vim_search", "dataset": "synthetic", "num_samples": 64, "img_size": 16}
    overrides.update({"epochs": 2, "batch_size": 16, "arch_warmup_epochs": 0, "warmup_epochs": 0, "log_interval": 1000})
    cfg = resolve_config(search.DEFAULTS, overrides={**overrides, "output": str(tmp_path), "experiment": "search"})
    out = search.main(cfg)
    run_dir = Path(out["run_dir"])
    derived = vsp.main({"source": str(run_dir), "quiet": True})
    arch = load_arch(derived["arch_path"])
    assert arch.provenance["checkpoint"] == "last.pt" and arch.provenance["epoch"] == 1
    assert arch.model == out["derived_model_name"] and [layer.label for layer in arch.layers] == out["labels"]
    for layer in arch.layers:  # the probabilities are the search's own, read back through the model
        assert layer.probs == pytest.approx(out["arch_probs"][layer.label], abs=1e-6)
    model = supernet.create_derived(arch, img_size=16, num_classes=10)
    assert model.arch_labels() == out["labels"]
    again = vsp.main({"source": str(run_dir / "last.pt"), "out": str(tmp_path / "again.yaml"), "quiet": True})
    assert load_arch(again["arch_path"]).orders == arch.orders
    assert "--dataset synthetic" not in derived["command"] and "--img-size 16" in derived["command"]
    assert derived["arch_moved"]


@pytest.mark.parametrize("module", ["vis_search_prob", "tune"])
def test_cli_warnings_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    """Like the trainers, the derivation and the sweep print a warning as one line, without Python's source line."""
    import importlib
    import warnings

    mod = importlib.import_module(f"nas.{module}")
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # the cli installs its own; restored after

    def main(cfg: dict[str, Any]) -> dict[str, Any]:
        warnings.warn("two\nlines", UserWarning, stacklevel=1)
        return {"finished": True}

    monkeypatch.setattr(mod, "main", main)
    argv = [str(_fake_run(tmp_path))] if module == "vis_search_prob" else []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert mod.cli(argv) == 0
    assert capsys.readouterr().err == "warning: two lines\n"
