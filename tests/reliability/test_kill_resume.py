"""SIGKILL at 5 random steps, ``--resume auto`` after each: the run ends bit-identical to an uninterrupted one.

The CLIs run as subprocesses on the CPU (reference scan, one thread). ``--checkpoint-interval`` saves ``last.pt``
every few steps, so a kill loses at most the steps since then, and the resumed run replays them exactly (data order,
position in the epoch, every RNG, optimizer and scheduler state). The kill steps are random; the seed is in the
failure message (set ``RELIABILITY_SEED`` to replay one).

Each case is a chain of processes, one after another, that mostly waits on interpreter start-up; the selected cases
run side by side (one thread each, started by the first test) so that the chains share the machine's cores, and
every test checks its own case's result.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
from reliability_testutils import (
    assert_same_state,
    finish,
    jsonl,
    rows,
    run_and_kill_at,
    selected_params,
    side_by_side,
    start,
)

SEARCH = [
    "--model", "test_local_vim_search", "--algo", "darts", "--img-size", "16", "--num-samples", "256",
    "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "0", "--arch-warmup-epochs", "0", "--lr", "3e-3",
    "--arch-lr", "3e-2", "--device", "cpu", "--log-interval", "1", "--checkpoint-interval", "3",
]  # fmt: skip
RETRAIN = [
    "--model", "test_vim", "--img-size", "16", "--num-samples", "192", "--batch-size", "16", "--epochs", "2",
    "--warmup-epochs", "0", "--lr", "3e-3", "--shuffle-max", "0.5", "--mixup", "0.2", "--model-ema",
    "--device", "cpu", "--log-interval", "1", "--checkpoint-interval", "3",
]  # fmt: skip
CASES = {
    "search": ("nas.search", SEARCH, 2 * (256 // 2 // 16)),
    "retrain": ("retrain.train", RETRAIN, 2 * (192 // 16)),
}


def _kill_resume_and_finish(which: str, tmp_path: Path) -> tuple[Path, str, str, int]:
    """One case: a straight run alongside the killed-and-resumed ones; returns (runs folder, seed message, log, number
    of kills after the first checkpoint)."""
    module, args, total_steps = CASES[which]
    seed = int(os.environ.get("RELIABILITY_SEED", time.time_ns() % 2**31))
    kills = sorted(random.Random(seed).sample(range(1, total_steps), 5))
    out = ["--output", str(tmp_path / "runs")]
    straight_log = tmp_path / "straight.log"
    straight = start(module, [*args, *out, "--experiment", "straight"], straight_log)  # runs alongside

    killed_log = tmp_path / "killed.log"
    killed_args = [*args, *out, "--experiment", "killed", "--resume", "auto"]
    seen = []
    try:
        for step in kills:
            rc, at = run_and_kill_at(module, killed_args, step, killed_log)
            seen.append(at)
            assert rc == -9, f"seed {seed}, kill at {step}: exit {rc}; {killed_log.read_text()[-2000:]}"
        finish(start(module, killed_args, killed_log), killed_log)
    except BaseException:
        straight.kill()
        straight.communicate()
        raise
    finish(straight, straight_log)
    # Every kill after the first checkpoint (step `interval`, saved when that step ends) must be followed by a resume
    # from a checkpoint; a kill at or before it may find none (three early draws once left only two).
    interval = int(args[args.index("--checkpoint-interval") + 1])
    resumable = sum(at > interval for at in seen)
    return tmp_path / "runs", f"seed {seed}: killed at steps {seen}", killed_log.read_text(), resumable


@pytest.fixture(scope="module")
def finished(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The selected cases' runs, started together by the first test: (case,) -> Future of its result."""
    keys = selected_params(request, "which")
    dirs = {key: tmp_path_factory.mktemp(f"kill_resume_{key[0]}") for key in keys}  # mktemp is not thread-safe
    with side_by_side(keys, lambda which: _kill_resume_and_finish(which, dirs[which,])) as futures:
        yield futures


@pytest.mark.parametrize("which", list(CASES))
def test_sigkill_at_five_random_steps_then_resume_is_bit_identical(finished: dict[tuple, Future], which) -> None:
    runs, msg, killed_log, resumable = finished[(which,)].result()
    a, b = runs / "straight", runs / "killed"
    assert killed_log.count("resume auto: using") >= resumable, msg
    assert_same_state(a / "last.pt", b / "last.pt")
    assert rows(a / "summary.csv") == rows(b / "summary.csv"), msg
    if which == "search":
        assert jsonl(a / "arch_probs.jsonl") == jsonl(b / "arch_probs.jsonl"), msg
