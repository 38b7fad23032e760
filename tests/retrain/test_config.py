"""Config resolution: defaults → YAML → CLI → overrides, and one-line errors naming the nearest key."""

from __future__ import annotations

import os
import signal
import stat
import warnings

import pytest
import yaml

from retrain.config import ConfigError, load_config, resolve_config, run_cli, save_config

DEFAULTS = {
    "model": "test_vim",
    "epochs": 3,
    "lr": 1e-3,
    "model_ema": False,
    "arch_betas": (0.5, 0.999),
    "clip_grad": None,
    "resume": "",
    "debug": False,
}


def test_defaults_copy_and_tuple_to_list() -> None:
    cfg = resolve_config(DEFAULTS)
    assert cfg == {**DEFAULTS, "arch_betas": [0.5, 0.999]}
    assert cfg is not DEFAULTS


def test_precedence_yaml_cli_overrides(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"epochs": 7, "lr": 2, "model": "from_yaml"}))
    cfg = resolve_config(DEFAULTS, ["-c", str(path), "--epochs", "9", "--model-ema", "--clip-grad", "1.5"])
    assert cfg["epochs"] == 9 and cfg["model"] == "from_yaml" and cfg["model_ema"] is True
    assert cfg["lr"] == 2.0 and isinstance(cfg["lr"], float)
    assert cfg["clip_grad"] == 1.5
    cfg = resolve_config(DEFAULTS, ["-c", str(path), "--no-model-ema"], overrides={"epochs": 11})
    assert cfg["epochs"] == 11 and cfg["model_ema"] is False
    cfg = resolve_config(DEFAULTS, ["--arch-betas", "0.9", "0.99", "--resume", "auto", "--clip-grad", "none"])
    assert cfg["arch_betas"] == [0.9, 0.99] and cfg["resume"] == "auto" and cfg["clip_grad"] is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"overrides": {"epoch": 3}}, "unknown key 'epoch'; did you mean 'epochs'"),
        ({"overrides": {"epochs": 2.5}}, "'epochs' must be an integer"),
        ({"overrides": {"model_ema": "yes"}}, "'model_ema' must be true/false"),
        ({"overrides": {"lr": "fast"}}, "'lr' must be a number"),
        ({"argv": ["--epohcs", "3"]}, "unknown argument '--epohcs'; did you mean '--epochs'"),
        ({"argv": ["--lr", "fast"]}, "invalid float value"),
        ({"argv": ["-c", "/nonexistent/x.yaml"]}, "config file not found"),
    ],
)
def test_errors_are_one_line(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match) as exc:
        resolve_config(DEFAULTS, **kwargs)
    assert "\n" not in str(exc.value)


def test_yaml_unknown_key_and_type(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("modle: x\n")
    with pytest.raises(ConfigError, match="unknown key 'modle'; did you mean 'model'"):
        resolve_config(DEFAULTS, ["-c", str(path)])
    path.write_text("epochs: [1, 2]\n")
    with pytest.raises(ConfigError, match="'epochs' must be an integer"):
        resolve_config(DEFAULTS, ["-c", str(path)])


def test_save_roundtrip(tmp_path) -> None:
    cfg = resolve_config(DEFAULTS, ["--epochs", "4"])
    path = save_config(cfg, tmp_path / "run" / "args.yaml")
    again = resolve_config(DEFAULTS, ["-c", str(path)])
    assert again == cfg


def test_run_cli_exit_codes(capsys) -> None:
    def main(cfg):
        if cfg["epochs"] < 0:
            raise ValueError("epochs must be >= 0,\n got a negative")
        return cfg

    assert run_cli(main, DEFAULTS, ["--epochs", "1"]) == 0
    assert run_cli(main, DEFAULTS, ["--epochs", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: epochs must be >= 0, got a negative"
    assert run_cli(main, DEFAULTS, ["--epoch", "1"]) == 2
    assert "did you mean '--epochs'" in capsys.readouterr().err
    assert run_cli(main, DEFAULTS, ["--epochs", "-1", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path) -> None:
    """PyYAML (YAML 1.1) reads ``1e-3`` as a string; a config's float key takes it as the number it means."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nepochs: 2\n")
    assert resolve_config(DEFAULTS, ["-c", str(path)])["lr"] == 0.001
    path.write_text("lr: 1e-3x\n")
    with pytest.raises(ConfigError, match=r"'lr' must be a number, got '1e-3x'"):
        resolve_config(DEFAULTS, ["-c", str(path)])


def test_a_folder_given_as_config_file_is_named_so(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"config file .* is a folder; pass a YAML file"):
        resolve_config(DEFAULTS, ["-c", str(tmp_path)])


def test_saved_config_follows_the_umask(tmp_path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    path = save_config(resolve_config(DEFAULTS), tmp_path / "args.yaml")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # as open() makes files, not mkstemp's 0600


def test_yaml_merge_keys_still_load(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {epochs: 2}\nother:\n  <<: *b\n  lr: 0.5\n")
    assert load_config(path) == {"base": {"epochs": 2}, "other": {"epochs": 2, "lr": 0.5}}


def test_run_cli_interrupted_status_and_one_line_warnings(capsys) -> None:
    """A run a signal stopped returns the shell's status for it; warnings print as one line each."""

    def main(cfg):
        warnings.warn("two\nlines", UserWarning, stacklevel=1)
        return {"interrupted": cfg["epochs"] > 1, "signal": int(signal.SIGTERM)}

    assert run_cli(main, DEFAULTS, ["--epochs", "1"]) == 0
    assert capsys.readouterr().err == "warning: two lines\n"
    assert run_cli(main, DEFAULTS, ["--epochs", "2"]) == 128 + signal.SIGTERM
    capsys.readouterr()

    def read_only(cfg):
        raise OSError(30, "Read-only file system", "/runs/x/args.yaml")

    assert run_cli(read_only, DEFAULTS, []) == 2
    assert capsys.readouterr().err == "error: [Errno 30] Read-only file system: '/runs/x/args.yaml'\n"


def test_an_error_from_a_dataloader_worker_prints_the_workers_own_line(capsys) -> None:
    """torch re-raises a worker's exception with the worker's traceback in its message: the line is the worker's."""
    msg = (
        "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise ValueError(...)\nValueError: imagefolder: cannot read image a.png (x)\n'
    )

    def main(cfg):
        raise ValueError(msg)

    assert run_cli(main, DEFAULTS, []) == 2
    assert capsys.readouterr().err == "error: imagefolder: cannot read image a.png (x)\n"


def test_a_key_given_twice_in_a_yaml_config_is_one_line(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 2\nlr: 0.1\nepochs: 3\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(key 'epochs' appears twice; keep one in .*line 3") as e:
        resolve_config(DEFAULTS, ["-c", str(path)])
    assert "\n" not in str(e.value)
    path.write_text("epochs: 2\nmodel_kwargs: {a: 1}\n")
    assert resolve_config({**DEFAULTS, "model_kwargs": {}}, ["-c", str(path)])["epochs"] == 2


def test_every_setting_of_the_three_clis_has_a_help_text(capsys) -> None:
    """--help describes each flag (the comment on its key's line of DEFAULTS), not only its default."""
    import nas.search
    import retrain.compare
    import retrain.train
    from retrain.config import defaults_help

    for module in (retrain.train, nas.search, retrain.compare):
        helps = defaults_help(module.__file__)
        assert not [k for k in module.DEFAULTS if not helps.get(k)], module.__name__
    assert (
        defaults_help(retrain.train.__file__)["resume"]
        == 'a checkpoint path, or "auto" (newest complete checkpoint of this run)'
    )
    with pytest.raises(SystemExit):
        run_cli(retrain.train.main, retrain.train.DEFAULTS, ["--help"], helps=defaults_help(retrain.train.__file__))
    out = " ".join(capsys.readouterr().out.split())
    assert "a checkpoint path, or \"auto\" (newest complete checkpoint of this run) (default: '')" in out
    assert "timm optimizer name" in out


def test_defaults_help_reads_only_the_named_dict(tmp_path) -> None:
    src = tmp_path / "mod.py"
    src.write_text(
        'OTHER = {"a": 1}  # not this\nDEFAULTS = {\n    "a": 1,  # the a\n    "b": "x#y",\n    "c": 2,  #\n'
        '    "d": [  # a list over\n        1,\n    ],\n    "e": "5%",  # 5% of it\n}\n'
    )
    from retrain.config import _build_parser, defaults_help

    helps = defaults_help(src)
    assert helps == {"a": "the a", "d": "a list over", "e": "5% of it"}
    assert defaults_help(tmp_path / "missing.py") == {}
    text = " ".join(_build_parser({"a": 1, "d": [1], "e": "5%"}, "", helps).format_help().split())
    assert "5% of it (default: '5%')" in text and "a list over (default: [1])" in text


def test_help_names_the_command_as_it_runs() -> None:
    """``python -m retrain.compare --help`` says ``usage: python -m retrain.compare``, not the file's name."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "retrain.compare", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m retrain.compare [-h]"), done.stdout[:200]


def test_a_collective_a_hung_peer_broke_is_one_line(tmp_path, capsys) -> None:
    """A rank that stopped answering (SIGSTOP, a hang) closes gloo's pair after --dist-timeout with a RuntimeError that
    names neither gloo nor a timeout; like a dead peer's, it is one line and an exit status of 1."""
    import torch.distributed as dist

    from retrain.config import run_cli

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:

        def main(cfg):
            raise RuntimeError("Application timeout caused pair closure")  # as gloo words it, naming neither

        assert run_cli(main, {"debug": False}, []) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: rank 0 lost contact with the other ranks"), err
    finally:
        dist.destroy_process_group()
