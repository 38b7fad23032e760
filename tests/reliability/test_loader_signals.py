"""Loader workers and stop signals: a signal to the whole process group leaves the workers running (the training
process checkpoints first), while the training process can still end them, stuck or not, and exit.

Each case runs in a fresh interpreter in a process group of its own (a signal to the group would reach pytest)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
from reliability_testutils import REPO, cli_env

PRELUDE = """
import os, signal, sys, threading, time
import torch
from torch.utils.data import Dataset
from retrain.data import build_loader

class Slow(Dataset):
    def __init__(self, stuck_from):
        self.stuck_from = stuck_from
    def __len__(self):
        return 64
    def __getitem__(self, i):
        if i >= self.stuck_from:
            time.sleep(60)  # a read that does not come back in time
        return torch.zeros(2), i
"""


def _run(body: str, timeout: float = 90) -> tuple[subprocess.CompletedProcess, float]:
    code = PRELUDE + textwrap.dedent(body)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout,
        start_new_session=True,
    )  # fmt: skip
    return proc, time.monotonic() - t0


@pytest.mark.parametrize("keep", ["dropped", "alive at exit"])
def test_a_stuck_worker_does_not_keep_the_process_from_exiting(keep: str) -> None:
    """The worker is stuck in a read (60 s) when the process is done with the loader: torch's shutdown, or at exit
    multiprocessing's, ends it (their SIGTERM comes from the worker's parent), so the process exits in seconds."""
    proc, took = _run(
        f"""
        loader = build_loader(Slow(stuck_from=2), batch_size=2, train=False, seed=0, num_workers=1)
        it = iter(loader)
        print("batch", next(it)[1].tolist(), flush=True)
        if {keep == "dropped"!r}:
            del it
        print("done", flush=True)
        """
    )
    assert proc.returncode == 0 and "batch [0, 1]" in proc.stdout and "done" in proc.stdout, proc.stderr[-2000:]
    assert took < 30, took


def test_group_signals_while_workers_start_and_run_do_not_kill_them() -> None:
    """SIGTERM and SIGINT sent to the whole group every millisecond while loaders start their workers and deliver
    batches (the window before a worker's init included): every batch arrives, the process's own handler sees the
    signals, and no worker dies of them."""
    proc, _ = _run(
        """
        seen = []
        signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
        signal.signal(signal.SIGINT, lambda s, f: seen.append(s))
        import subprocess
        storm = (  # another process of the group, as a scheduler's or timeout's signal comes from one
            "import os, signal, time\\n"
            "for s in (signal.SIGTERM, signal.SIGINT): signal.signal(s, signal.SIG_IGN)\\n"
            "while True:\\n"
            "    os.killpg(0, signal.SIGTERM); os.killpg(0, signal.SIGINT); time.sleep(0.001)\\n"
        )
        sender = subprocess.Popen([sys.executable, "-c", storm])
        time.sleep(1.0)  # under way
        got = 0
        for _ in range(15):
            loader = build_loader(Slow(stuck_from=10**9), batch_size=8, train=False, seed=0, num_workers=2)
            got += sum(len(y) for _, y in loader)
        sender.kill()
        print("items", got, "signals", len(seen) > 0, flush=True)
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "items 960 signals True" in proc.stdout, (proc.stdout, proc.stderr[-2000:])
