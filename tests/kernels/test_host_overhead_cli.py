"""scripts/host_overhead.py: a model name it cannot build is a one-line error before any GPU work."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "scripts" / "host_overhead.py"
_spec = importlib.util.spec_from_file_location("host_overhead", _PATH)
host_overhead = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_overhead)


def test_unknown_model_is_a_one_line_error_with_a_suggestion() -> None:
    with pytest.raises(SystemExit) as e:
        host_overhead.main(["--no-ops", "--models", "vim_tiyn"])
    msg = str(e.value)
    assert msg.startswith("error: unknown model 'vim_tiyn'") and "did you mean 'vim_tiny'" in msg and "\n" not in msg
