"""Sweeps on a real local Ray (2 CPUs, one start shared by the tests): results, ASHA, resume, space validation."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nas import tune as nt
from retrain.config import ConfigError, resolve_config

ROOT = Path(__file__).resolve().parents[2]

# A tiny Vim on the synthetic data: about a second per epoch once a worker has imported torch.
BASE = {
    "model": "test_vim",
    "dataset": "synthetic",
    "num_samples": 256,
    "img_size": 16,
    "epochs": 4,
    "batch_size": 32,
    "warmup_epochs": 0,
    "log_interval": 1000,
    "checkpoint_hist": 0,
}


def _write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def test_sweep_writes_tables_best_config_and_asha_stops_early(
    tmp_path: Path, ray_local: str, capsys: pytest.CaptureFixture
) -> None:
    # lr spans "learns nothing in 4 epochs" (1e-6) to "learns fast" (3e-2). Trials run one at a time with a seeded
    # sampler, so the order is fixed: a chance-level trial reaching rung 1 after a learning one is below the median
    # (reduction factor 2) and must be stopped there.
    space = _write(
        tmp_path / "space.yaml",
        {
            "params": {"lr": {"distribution": "loguniform", "low": 1e-6, "high": 3e-2}},
            "seed": 0,
            "asha": {"grace_period": 1, "reduction_factor": 2},
        },
    )
    t0 = time.monotonic()
    out = nt.main(
        {
            "target": "retrain",
            "config": _write(tmp_path / "base.yaml", BASE),
            "space": space,
            "num_samples": 4,
            "max_concurrent": 1,
            "output": str(tmp_path / "sweeps"),
            "name": "s",
            "quiet": True,
        }
    )
    assert time.monotonic() - t0 < 120
    assert out["finished"] and len(out["rows"]) == 4
    assert any(r["status"] == "stopped early" and r["epochs"] < 4 for r in out["rows"]), out["rows"]
    files = out["files"]
    for key in ("md", "csv", "plot", "best_config", "sweep"):
        assert files[key].is_file(), key
    md = files["md"].read_text()
    assert md.count("\n| ") == 5 and "stopped early" in md
    from retrain import train

    best = resolve_config(train.DEFAULTS, argv=["-c", str(files["best_config"])])  # the target's -c accepts it
    assert best["lr"] == pytest.approx(out["best"]["lr"]) and best["model"] == "test_vim"
    # The base config validated on the test split: the trials (and the best config) hold out part of train instead.
    assert best["val_frac"] == nt.RETRAIN_VAL_FRAC
    assert "trials hold out val_frac 0.1 of the train split" in capsys.readouterr().out
    # Each trial is an ordinary retrain run inside the sweep directory.
    assert all((Path(r["_path"]) / "run" / "summary.csv").is_file() for r in out["rows"])


def test_interrupted_sweep_resumes_and_finishes(tmp_path: Path, ray_local: str) -> None:
    base = _write(tmp_path / "base.yaml", {**BASE, "epochs": 6})
    space = _write(
        tmp_path / "space.yaml",
        {"params": {"lr": {"distribution": "loguniform", "low": 1e-3, "high": 1e-2}}, "asha": {"grace_period": 6}},
    )
    sweep_dir = tmp_path / "sweeps" / "r"
    cmd = [sys.executable, "-m", "nas.tune", "--target", "retrain", "-c", base, "--space", space, "--num-samples", "2",
           "--max-concurrent", "1", "--output", str(tmp_path / "sweeps"), "--name", "r", "--address", ray_local,
           "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 90
    # Ctrl-C as soon as the first trial has reported an epoch (and so written a checkpoint).
    for line in proc.stdout:
        lines.append(line)
        if " epoch " in line or time.monotonic() > deadline:
            proc.send_signal(signal.SIGINT)
            break
    proc.stdout.read()
    assert proc.wait(timeout=60) != 0, "".join(lines)
    assert (sweep_dir / "sweep.yaml").is_file()

    out = nt.main({"resume": str(sweep_dir), "quiet": True})
    assert out["finished"], out["rows"]
    assert len(out["rows"]) == 2 and all(r["status"] == "completed" for r in out["rows"])
    # The interrupted trial continued from its checkpoint rather than starting over: one summary row per epoch.
    for r in out["rows"]:
        summary = (Path(r["_path"]) / "run" / "summary.csv").read_text().strip().splitlines()
        assert len(summary) == 1 + 6


@pytest.mark.parametrize(
    "space,match",
    [
        ({"params": {"lr": {"distribution": "logunifrom", "low": 1e-4, "high": 1e-2}}}, "did you mean 'loguniform'"),
        ({"params": {"lr": {"distribution": "uniform", "low": 0.1, "high": 0.01}}}, r"low \(0.1\) must be below"),
        ({"params": {"weight_decy": {"distribution": "uniform", "low": 0, "high": 1}}}, "did you mean 'weight_decay'"),
        ({"params": {"lr": {"distribution": "loguniform", "low": 0, "high": 1}}}, "loguniform needs low > 0"),
        (
            {"params": {"epochs": {"distribution": "uniform", "low": 1, "high": 5}}},
            "is an integer; use distribution: int",
        ),
        ({"params": {"model": {"distribution": "choice", "values": [1, 2]}}}, "'model' must be a string"),
        ({"params": {"output": {"distribution": "choice", "values": ["a"]}}}, "set by the sweep"),
        ({"parms": {}}, "did you mean 'params'"),
        ({"params": {"lr": {"distribution": "choice", "values": []}}}, "non-empty list"),
    ],
)
def test_bad_space_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture, space: dict, match: str) -> None:
    from retrain import train

    path = _write(tmp_path / "space.yaml", space)
    with pytest.raises(ConfigError, match=match) as err:
        nt.load_sweep_space(path, train.DEFAULTS)
    assert "\n" not in str(err.value)
    # The CLI turns it into one line on stderr and exit status 2, before Ray starts.
    base = _write(tmp_path / "base.yaml", BASE)
    assert nt.cli(["--target", "retrain", "-c", base, "--space", path, "--output", str(tmp_path)]) == 2
    err_text = capsys.readouterr().err.strip()
    assert err_text.startswith("error: ") and "\n" not in err_text


def test_space_parsing_and_domains(tmp_path: Path) -> None:
    from retrain import train

    path = _write(
        tmp_path / "space.yaml",
        {
            "params": {
                "lr": {"distribution": "loguniform", "low": "1e-4", "high": "1e-2"},  # YAML 1.1 strings are accepted
                "epochs": {"distribution": "int", "low": 2, "high": 3},
                "shuffle-max": {"distribution": "choice", "values": [0.0, 0.5]},
            },
            "seed": 3,
            "asha": {"grace_period": 2, "reduction_factor": 3},
        },
    )
    sp = nt.load_sweep_space(path, train.DEFAULTS)
    assert {p.name for p in sp.params} == {"lr", "epochs", "shuffle_max"} and sp.seed == 3 and sp.grace_period == 2
    dom = sp.param_space()
    assert {dom["epochs"].sample() for _ in range(50)} == {2, 3}  # int: both ends included
    assert 1e-4 <= dom["lr"].sample() <= 1e-2
    # Every extreme passes the target's range checks as a trial resolves it: a choice of YAML 1.1 strings too.
    (tmp_path / "lr.yaml").write_text("params:\n  lr: {distribution: choice, values: [1e-3, 3e-4]}\n")
    base = nt.resolve_config(train.DEFAULTS)
    nt._check_ranges(train, base, nt.load_sweep_space(tmp_path / "lr.yaml", train.DEFAULTS), "lr.yaml")
    (tmp_path / "lr.yaml").write_text("params:\n  lr: {distribution: choice, values: [1e-3, -1e-3]}\n")
    with pytest.raises(nt.ConfigError, match=r"lr.yaml: params.lr can be '-1e-3', which a trial refuses: --lr -0.001"):
        nt._check_ranges(train, base, nt.load_sweep_space(tmp_path / "lr.yaml", train.DEFAULTS), "lr.yaml")


def test_a_refusal_names_the_base_config_only_when_no_trial_could_run(tmp_path: Path) -> None:
    """A base config refused by itself (arch_warmup_epochs 1 of 1 epoch) is named when every swept value keeps it
    refused; a swept epochs range that lets some trials run names the swept key's refused end instead."""
    from nas import search

    base = nt.resolve_config(search.DEFAULTS, overrides={"epochs": 1, "arch_warmup_epochs": 1})
    (tmp_path / "lr.yaml").write_text("params:\n  lr: {distribution: loguniform, low: 1e-4, high: 1e-2}\n")
    with pytest.raises(nt.ConfigError, match=r"^base.yaml: every trial would refuse it: --arch-warmup-epochs 1"):
        nt._check_ranges(
            search, base, nt.load_sweep_space(tmp_path / "lr.yaml", search.DEFAULTS), "lr.yaml", "base.yaml"
        )
    (tmp_path / "ep.yaml").write_text("params:\n  epochs: {distribution: int, low: 1, high: 10}\n")
    with pytest.raises(nt.ConfigError, match=r"^ep.yaml: params.epochs can be 1, which a trial refuses: --arch-warm"):
        nt._check_ranges(
            search, base, nt.load_sweep_space(tmp_path / "ep.yaml", search.DEFAULTS), "ep.yaml", "base.yaml"
        )


def test_retrain_target_metric_and_held_out_default(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from retrain import train

    base = resolve_config(train.DEFAULTS, overrides=BASE)
    assert nt.target_for("retrain", base).metric == "top1"
    assert nt.target_for("retrain", {**base, "model_ema": True}).metric == "ema_top1"  # what best.pt is chosen by
    assert nt.target_for("search", {"model_ema": True}).metric == "arch_top1"
    held, note = nt.held_out_base("retrain", base)
    assert held["val_frac"] == 0.1 and base["val_frac"] == 0.0 and "val_frac 0.1" in note
    assert nt.held_out_base("retrain", {**base, "val_frac": 0.2}) == ({**base, "val_frac": 0.2}, None)
    assert nt.held_out_base("search", {"seed": 0}) == ({"seed": 0}, None)
    # Sweeping the validation fraction itself is refused before Ray starts.
    space = _write(
        tmp_path / "space.yaml", {"params": {"val_frac": {"distribution": "uniform", "low": 0.1, "high": 0.3}}}
    )
    code = nt.cli(["--target", "retrain", "-c", _write(tmp_path / "base.yaml", BASE), "--space", space])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "'val_frac' cannot be swept" in err and "\n" not in err


@pytest.mark.parametrize(
    "target,base,match",
    [
        ("retrain", {"img_size": 18}, r"img_size \(18, 18\) is not divisible by patch_size"),
        ("retrain", {"dataset": "fashion_mnist", "data_dir": "nowhere/fm.npz"}, "nowhere"),
        ("search", {"model": "test_local_vim_search", "space": "nowhere.yaml"}, "nowhere.yaml"),
    ],
)
def test_a_base_config_every_trial_would_refuse_stops_before_the_sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture, target: str, base: dict, match: str
) -> None:
    """The base config's data and model are checked once, before Ray or any file: one line, exit 2, no sweep."""
    cfg = {**BASE, **base}
    if target == "search":
        cfg = {k: v for k, v in cfg.items() if k != "checkpoint_hist"}
    path = _write(tmp_path / "base.yaml", cfg)
    space = _write(
        tmp_path / "space.yaml", {"params": {"lr": {"distribution": "loguniform", "low": 1e-3, "high": 1e-2}}}
    )
    out = tmp_path / "sweeps"
    argv = ["--target", target, "-c", path, "--space", space, "--output", str(out), "--name", "x"]
    assert nt.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: every trial would fail: ") and "\n" not in err
    assert match in err or __import__("re").search(match, err), err
    assert not out.exists()


def test_a_refused_trial_size_leaves_no_sweep_and_resume_takes_only_resources(
    tmp_path: Path, ray_local: str, capsys: pytest.CaptureFixture
) -> None:
    base = _write(tmp_path / "base.yaml", BASE)
    space = _write(
        tmp_path / "space.yaml", {"params": {"lr": {"distribution": "loguniform", "low": 1e-3, "high": 1e-2}}}
    )
    out = tmp_path / "sweeps"
    argv = ["--target", "retrain", "-c", base, "--space", space, "--output", str(out), "--name", "g", "--address",
            ray_local, "--gpus-per-trial", "64"]  # fmt: skip
    assert nt.cli(argv) == 2
    assert "--gpus-per-trial 64 but the Ray cluster has" in capsys.readouterr().err
    assert not (out / "g" / "sweep.yaml").exists()  # the same --name is free for the corrected command

    sweep = out / "saved"  # a sweep saved earlier: --resume continues it as saved
    sweep.mkdir(parents=True)
    saved = {"target": "retrain", "space": space, "num_samples": 2, "max_concurrent": 0, "cpus_per_trial": 1.0,
             "gpus_per_trial": 64.0, "workdir": str(tmp_path), "base_config": BASE}  # fmt: skip
    _write(sweep / "sweep.yaml", saved)
    with pytest.raises(ConfigError, match=r"cannot take --num-samples 3, --name other; drop them"):
        nt.main({"resume": str(sweep), "num_samples": 3, "name": "other"})
    with pytest.raises(ConfigError, match="--gpus-per-trial 64 but"):  # as saved
        nt.main({"resume": str(sweep), "address": ray_local, "quiet": True})
    with pytest.raises(ConfigError, match="--cpus-per-trial 64 but"):  # the new trial size is the one checked
        nt.main({"resume": str(sweep), "address": ray_local, "quiet": True, "gpus_per_trial": 0.0,
                 "cpus_per_trial": 64.0})  # fmt: skip
    assert yaml.safe_load((sweep / "sweep.yaml").read_text()) == saved  # a refused resume changes nothing
