"""SIGTERM / SIGINT on the real CLIs: checkpoint at the next step boundary, a clear message, and the shell's exit
status for that signal (128 + its number: 130, 143), so that a script running them stops too.

The selected runs start together (one thread each, by the first test) so that their interpreter start-ups share the
machine's cores; every test checks its own run.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
from reliability_testutils import selected_params, side_by_side, start

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


def _signal_once_under_way(module: str, sig: signal.Signals, tmp_path: Path) -> tuple[int, str, Path]:
    """Start the CLI with a data-loader worker, in a process group of its own, and send ``sig`` to the whole group
    (as Slurm, ``timeout`` and a terminal's Ctrl-C do: the workers get it too) once a progress line reports a step;
    returns (exit status, output, run folder)."""
    log = tmp_path / "stderr.log"
    args = [*ARGS[module], "--workers", "1", "--output", str(tmp_path / "runs"), "--experiment", "run"]
    proc = start(module, args, log, new_session=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # wait until training is under way (a progress line with a step count)
        lines.append(line)
        if "] step " in line:
            os.killpg(proc.pid, sig)
            break
    lines.extend(proc.stdout)
    code = proc.wait(timeout=120)
    return code, "".join(lines) + log.read_text(), tmp_path / "runs" / "run"


@pytest.fixture(scope="module")
def signalled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(module, signal) -> Future of its run, for every selected test of this file, started together."""

    keys = selected_params(request, "module", "sig")
    dirs = {key: tmp_path_factory.mktemp(f"{key[0]}-{key[1].name}") for key in keys}  # mktemp is not thread-safe
    with side_by_side(keys, lambda module, sig: _signal_once_under_way(module, sig, dirs[module, sig])) as futures:
        yield futures


@pytest.mark.parametrize("module", list(ARGS))
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_and_exits_with_its_status(
    signalled: dict[tuple, Future], module: str, sig: signal.Signals
) -> None:
    code, out, run_dir = signalled[(module, sig)].result()
    assert code == 128 + int(sig), out[-2000:]
    assert f"stopped by signal {int(sig)}" in out and "--resume auto" in out
    assert "send it again after 3 s to stop now" in out  # the grace period the README gives for a repeat
    assert out.count("stopping at the next step boundary") == 1 and "killed by signal" not in out, out[-2000:]
    state = load_checkpoint(run_dir / "last.pt")
    assert state["epoch"] < 49  # saved mid-run, not at the end


def test_second_sigint_stops_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    """The first SIGINT only sets the flag (and says how to stop now); a repeat within the grace period is the same
    request delivered twice; one after it raises KeyboardInterrupt inside the step, as without the flag; the previous
    handler is back afterwards."""
    import time

    from retrain.engine import StopFlag

    # Python's own SIGINT handler, as a CLI has it (earlier tests in this process, e.g. Ray's, may have replaced it).
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with StopFlag(repeat_after=0.3) as stop:
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)  # a duplicate: no interrupt
                assert stop.signum == signal.SIGINT
                time.sleep(0.4)
                signal.raise_signal(signal.SIGINT)
                pytest.fail("the repeated SIGINT did not interrupt")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)
    assert "send it again after 0.3 s to stop now" in capsys.readouterr().err


def test_second_sigterm_terminates_a_stuck_step() -> None:
    """A process whose step never ends: the first SIGTERM is noted, a duplicate right after it is ignored, a repeat
    after the grace period terminates it by SIGTERM."""
    import subprocess
    import sys

    code = (
        "import os, signal, time\n"
        "from retrain.engine import StopFlag\n"
        "with StopFlag(repeat_after=0.5) as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.6)\n"
        "    print('flag', stop.signum, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "print('not stopped', flush=True)\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stdout, proc.stderr)
    assert f"flag {int(signal.SIGTERM)}" in proc.stdout and "not stopped" not in proc.stdout
    assert proc.stderr.count("SIGTERM: stopping at the next step boundary") == 1, proc.stderr


def test_compare_passes_sigterm_on_to_its_side_by_side_trainings(tmp_path: Path) -> None:
    """``retrain.compare --jobs 2`` under a scheduler's SIGTERM (to it alone, not its process group): the running
    trainings get it too and save their checkpoints, none starts after it, and compare ends as interrupted (one
    line, 143) rather than leaving its trainings running."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "dataset: synthetic\nimg_size: 16\nnum_samples: 512\nbatch_size: 8\nepochs: 400\nwarmup_epochs: 0\n"
        "log_interval: 1\ndevice: cpu\n"
    )
    cfg = tmp_path / "compare.yaml"
    cfg.write_text(
        f"train_config: {recipe}\nseeds: [0, 1, 2]\non_mismatch: flag\nmodels:\n  - {{name: vim, model: test_vim}}\n"
    )
    log = tmp_path / "stderr.log"
    proc = start("retrain.compare", ["-c", str(cfg), "--output", str(tmp_path / "out"), "--jobs", "2"], log)
    assert proc.stdout is not None
    started = 0
    for line in proc.stdout:
        started += line.startswith("== start")
        if started == 2:
            break
    runs = tmp_path / "out" / "comparison" / "runs" / "vim"
    deadline = time.monotonic() + 240  # a loaded machine (the suite's other workers) starts them slowly

    def under_way(seed: int) -> bool:  # a progress line in the training's log
        log_path = runs / f"seed{seed}.log"
        return log_path.exists() and "] step " in log_path.read_text()

    while time.monotonic() < deadline and not (under_way(0) and under_way(1)):
        time.sleep(0.5)
    if not (under_way(0) and under_way(1)):
        proc.send_signal(signal.SIGTERM)  # compare passes it on: no training is left running
        proc.wait(timeout=120)
        logs = {
            s: (runs / f"seed{s}.log").read_text()[-1500:] if (runs / f"seed{s}.log").exists() else None for s in (0, 1)
        }
        pytest.fail(f"the two trainings did not both get under way in 240 s: {logs}")
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    code = proc.wait(timeout=120)
    err = log.read_text()
    assert code == 128 + signal.SIGTERM, (code, out[-2000:], err[-2000:])
    assert err.strip().splitlines()[-1].startswith("interrupted: stopped by a signal"), err[-2000:]
    for s in (0, 1):
        assert "stopped by signal 15" in (runs / f"seed{s}.log").read_text()
        assert load_checkpoint(runs / f"seed{s}" / "last.pt")["epoch"] < 399
    assert not (runs / "seed2").exists() and "== start vim, seed 2" not in out
