"""Helpers of the reliability tests: run the CLIs as subprocesses on one CPU thread, compare finished runs."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from retrain.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]


def selected_params(request: Any, *names: str) -> list[tuple]:
    """The distinct values of the parameters ``names`` among this module's tests that the session will run."""
    seen: dict[tuple, None] = {}
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        if getattr(item, "module", None) is request.module and spec is not None and set(names) <= spec.params.keys():
            seen[tuple(spec.params[n] for n in names)] = None
    return list(seen)


def is_selected(request: Any, test_name: str) -> bool:
    """Whether the session will run this module's test ``test_name`` (a fixture that starts its work early asks)."""
    items = request.session.items
    return any(getattr(it, "module", None) is request.module and it.originalname == test_name for it in items)


@contextlib.contextmanager
def side_by_side(keys: Sequence[tuple], run: Callable[..., Any]) -> Iterator[dict[tuple, Future]]:
    """``run(*key)`` for every key at once, one thread each (each mostly waits on its own CLI processes, so they
    share the cores); yields key -> Future, whose ``result()`` re-raises what the run raised. Waits for all on exit.
    """
    pool = ThreadPoolExecutor(max_workers=max(1, len(keys)))
    try:
        yield {key: pool.submit(run, *key) for key in keys}
    finally:
        pool.shutdown(wait=True)


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: this checkout importable, one thread (tiny models on a shared CPU)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.setdefault("TRITON_INTERPRET", "1")
    return env


def start(module: str, args: Sequence[str], log: Path, new_session: bool = False) -> subprocess.Popen:
    """``python -m module args`` with stdout piped (progress lines) and stderr appended to ``log``; ``new_session``:
    in a process group of its own (its pid), as a scheduler or ``timeout`` runs it, to be signalled as a group."""
    err = open(log, "a")
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        start_new_session=new_session,
    )
    err.close()
    return proc


_STEP = re.compile(r"\] step (\d+) ")


def run_and_kill_at(module: str, args: Sequence[str], step: int, log: Path) -> tuple[int, int | None]:
    """Run until a progress line reports ``step`` (or later), then SIGKILL; return (exit status, step seen)."""
    proc = start(module, args, log)
    seen = None
    assert proc.stdout is not None
    for line in proc.stdout:
        m = _STEP.search(line)
        if m and int(m.group(1)) >= step:
            seen = int(m.group(1))
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    return proc.wait(timeout=120), seen


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Wait for a run; fail with the end of its stderr when it does not exit 0."""
    assert proc.stdout is not None
    proc.stdout.read()
    proc.stdout.close()
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f"exit {rc}: {log.read_text()[-3000:]}"


def rows(path: Path, drop: Sequence[str] = ("img_s",)) -> list[dict[str, str]]:
    """``summary.csv`` rows without the columns that measure time."""
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_same_state(a_path: Path, b_path: Path) -> None:
    """Two checkpoints hold bit-identical weights, arch logits (search), optimizer state and step."""
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    assert (a["step"], a["next_epoch"], a["next_batch"]) == (b["step"], b["next_epoch"], b["next_batch"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    diff = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not diff, f"weights differ: {diff[:5]}"
    if "arch_logits" in a:
        assert all(torch.equal(a["arch_logits"][k], b["arch_logits"][k]) for k in a["arch_logits"])
    for opt in ("optimizer", "arch_optimizer", "state_dict_ema"):
        if a.get(opt) is None:
            continue
        sa = a[opt]["state"] if "state" in a[opt] else a[opt]
        sb = b[opt]["state"] if "state" in b[opt] else b[opt]
        for k in sa:
            va, vb = sa[k], sb[k]
            if isinstance(va, dict):
                assert all(torch.equal(torch.as_tensor(va[n]), torch.as_tensor(vb[n])) for n in va), (opt, k)
            else:
                assert torch.equal(torch.as_tensor(va), torch.as_tensor(vb)), (opt, k)


def fingerprint(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and folder under ``root``: (size, mtime in ns, sha1 of a file's bytes), to show that nothing was
    written, touched or replaced."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.stat()
            digest = hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns, digest)
    return out
