"""SIGTERM / SIGINT on the real CLIs: checkpoint at the next step boundary, a clear message, exit status 0."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from reliability_testutils import start

from retrain.checkpoint import load_checkpoint

ARGS = {
    "retrain.train": [
        "--model", "test_vim", "--img-size", "16", "--num-samples", "512", "--batch-size", "8", "--epochs", "50",
        "--device", "cpu", "--log-interval", "1",
    ],
    "nas.search": [
        "--model", "test_local_vim_search", "--img-size", "16", "--num-samples", "512", "--batch-size", "8",
        "--epochs", "50", "--device", "cpu", "--log-interval", "1",
    ],
}  # fmt: skip


@pytest.mark.parametrize("module", list(ARGS))
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_and_exits_zero(tmp_path: Path, module: str, sig: signal.Signals) -> None:
    log = tmp_path / "stderr.log"
    proc = start(module, [*ARGS[module], "--output", str(tmp_path / "runs"), "--experiment", "run"], log)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # wait until training is under way (a progress line with a step count)
        lines.append(line)
        if "] step " in line:
            proc.send_signal(sig)
            break
    lines.extend(proc.stdout)
    code = proc.wait(timeout=120)
    out = "".join(lines) + log.read_text()
    assert code == 0, out[-2000:]
    assert f"stopped by signal {int(sig)}" in out and "--resume auto" in out
    state = load_checkpoint(tmp_path / "runs" / "run" / "last.pt")
    assert state["epoch"] < 49  # saved mid-run, not at the end
