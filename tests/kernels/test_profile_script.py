"""scripts/profile_scan.py: its grid choice and its one-line errors (the profiling itself needs a GPU)."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "scripts" / "profile_scan.py"
_spec = importlib.util.spec_from_file_location("profile_scan", _PATH)
profile_scan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_scan)


@pytest.mark.parametrize("seqlen, hw", [(197, (14, 14)), (3136, (56, 56)), (15, (3, 5)), (1134, (27, 42))])
def test_grid_is_the_squarest_fit_with_an_optional_class_token(seqlen, hw):
    assert profile_scan._grid(seqlen) == hw


@pytest.mark.parametrize(
    "extra, message",
    [(["--configs", "4,a"], "comma-separated integers"), (["--configs", "4,8,1", "--hw", "5", "5"], "does not give")],
)
def test_bad_arguments_are_one_line_errors(capsys, extra, message):
    assert profile_scan.main(["--shape", "2", "8", "37", "4", "2", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


_CONV = Path(__file__).resolve().parents[2] / "scripts" / "profile_conv.py"
_conv_spec = importlib.util.spec_from_file_location("profile_conv", _CONV)
profile_conv = importlib.util.module_from_spec(_conv_spec)
_conv_spec.loader.exec_module(profile_conv)


@pytest.mark.parametrize("spec, message", [("32,a,4", "BLOCK_T,BLOCK_D,warps"), ("32,128", "expected (BLOCK_T"),
                                           ("32,100,4", "powers of two"), ("32,128,4,-1", "SPAN must be"),
                                           ("32,128,4,2,1", "expected (BLOCK_T")])  # fmt: skip
def test_profile_conv_bad_configs_are_one_line_errors(capsys, spec, message):
    assert profile_conv.main(["--shape", "2", "8", "37", "2", "--configs", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


_MODEL = Path(__file__).resolve().parents[2] / "scripts" / "profile_model.py"
_model_spec = importlib.util.spec_from_file_location("profile_model", _MODEL)
profile_model = importlib.util.module_from_spec(_model_spec)
_model_spec.loader.exec_module(profile_model)


def test_profile_model_bad_model_kwargs_are_one_line_errors(capsys):
    assert profile_model.main(["--model", "vim_tiny", "--model-kwargs", "mix"]) == 2
    err = capsys.readouterr().err.strip()
    assert "KEY=VALUE" in err and len(err.splitlines()) == 1
