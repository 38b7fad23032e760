"""Two processes under torchrun (gloo, CPU): the ranks agree on everything, and a dead rank stops the run cleanly.

This file is also the rank script: torchrun starts it as ``__main__`` with a mode and a directory.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import yaml
from reliability_testutils import REPO, cli_env

from retrain.checkpoint import load_checkpoint

TINY = {
    "model": "test_local_vim_search",
    "algo": "darts",
    "img_size": 16,
    "num_samples": 128,
    "batch_size": 8,
    "epochs": 1,
    "warmup_epochs": 0,
    "arch_warmup_epochs": 0,
    "arch_lr": 3e-2,
    "device": "cpu",
}  # 2 ranks x 4 steps per epoch


def _torchrun(mode: str, out_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["--max-restarts", "0", __file__, mode, str(out_dir)]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


class _Output:
    """A run's output, read by a thread so that waiting for a line can time out: a run that hangs fails its test
    instead of stalling the suite (its process group is killed then)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines, self._queue = proc, [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def until(self, needle: str | None, seconds: float) -> str:
        """Read up to the first line holding ``needle`` (None: to the end); the text read so far."""
        end = time.monotonic() + seconds
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(
                    f"no {needle or 'end'!r} in {seconds} s:\n" + "".join(self.lines)[-3000:]
                ) from None
            if line is None:
                if needle is None:
                    self.proc.wait(timeout=30)
                    return "".join(self.lines)
                raise AssertionError(f"the run ended without {needle!r}:\n" + "".join(self.lines)[-3000:])
            self.lines.append(line)
            if needle is not None and needle in line:
                return "".join(self.lines)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def test_ranks_agree_on_logits_bad_steps_and_derived_arch(tmp_path) -> None:
    """Rank 1 alone gets a NaN gradient: both ranks skip that step, and end with the same logits and arch."""
    proc = _torchrun("agree", tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["bad_steps"] == r1["bad_steps"] == 1
    assert r0["logits"].keys() == r1["logits"].keys()
    assert all(torch.equal(r0["logits"][k], r1["logits"][k]) for k in r0["logits"])
    assert yaml.safe_load((tmp_path / "arch0.yaml").read_text()) == yaml.safe_load(
        (tmp_path / "arch1.yaml").read_text()
    )
    saved = load_checkpoint(tmp_path / "runs" / "agree" / "last.pt")["arch_logits"]
    assert all(torch.equal(saved[k], r0["logits"][k]) for k in saved)


def test_a_killed_rank_stops_the_run_without_hanging_and_it_resumes(tmp_path) -> None:
    out = _Output(_torchrun("kill", tmp_path))
    try:
        out.until("] step 3 ", 120)  # checkpoints at steps 2, 4, ...: kill rank 1 between two
        os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGKILL)
        t_kill = time.monotonic()
        text = out.until(None, 60)
    finally:
        out.kill()
    assert out.proc.returncode != 0 and time.monotonic() - t_kill < 45, text[-3000:]
    assert "[rank0]: Traceback" not in text and "error: rank 0 lost contact with the other ranks" in text, text[-3000:]
    state = load_checkpoint(tmp_path / "runs" / "kill" / "last.pt", expect_kind="search")
    assert state["step"] >= 2

    proc = _torchrun("resume", tmp_path)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text[-3000:]
    assert "resume auto: using" in text
    assert load_checkpoint(tmp_path / "runs" / "kill" / "last.pt")["step"] == 2 * 128 // 2 // 2 // 8


def test_a_hung_rank_stops_the_others_after_dist_timeout(tmp_path) -> None:
    """Rank 1 is stopped (SIGSTOP: alive, holding its connections, silent) mid-run: rank 0 gives up after
    ``--dist-timeout`` (5 s here) with the one-line lost-contact message, not a traceback and not a hang."""
    out = _Output(_torchrun("hang", tmp_path))
    try:
        out.until("] step 3 ", 120)
        pid = int((tmp_path / "rank1.pid").read_text())
        os.kill(pid, signal.SIGSTOP)
        t_stop = time.monotonic()
        out.until("lost contact with the other ranks", 60)
        waited = time.monotonic() - t_stop
        with contextlib.suppress(ProcessLookupError):  # the stopped rank would not act on torchrun's SIGTERM
            os.kill(pid, signal.SIGKILL)
        text = out.until(None, 60)
    finally:
        out.kill()
    # waited: about the timeout (rank 0 may have been waiting on rank 1 a little before the stop), far below a hang
    assert out.proc.returncode != 0 and 2 < waited < 45, (waited, text[-3000:])
    assert "error: rank 0 lost contact with the other ranks" in text and "[rank0]: Traceback" not in text, text[-3000:]


def test_ranks_whose_arch_logits_differ_stop_before_checkpointing_them(tmp_path) -> None:
    """Rank 1's logits are nudged just before the second checkpoint: the check that runs at every checkpoint sees it
    on both ranks, the run stops without hanging, and last.pt stays the first checkpoint (step 2), never the
    inconsistent one."""
    proc = _torchrun("diverge", tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-3000:]
    for rank in (0, 1):  # each rank raised it (a traceback also quotes the message in its source line)
        assert f"[rank{rank}]: RuntimeError: arch logits differ across ranks" in out, out[-3000:]
    assert load_checkpoint(tmp_path / "runs" / "diverge" / "last.pt", expect_kind="search")["step"] == 2


if __name__ == "__main__":  # one rank, started by torchrun
    import nas.search as search
    from nas.vis_search_prob import derive
    from search_spaces import load_space

    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    cfg = {**TINY, "output": str(out_dir / "runs"), "dist_timeout": 20.0}
    if mode == "agree":
        result = search.main({**cfg, "experiment": "agree", "debug_nan_grad_at": [3] if rank == 1 else []})
        logits = {k: torch.tensor(v) for k, v in result["arch_logits"].items()}
        torch.save({"logits": logits, "bad_steps": result["bad_steps"]}, out_dir / f"rank{rank}.pt")
        probs = [result["arch_probs"][label] for label in result["labels"]]
        arch = derive(result["labels"], probs, load_space("localmamba"), model=result["derived_model_name"])
        (out_dir / f"arch{rank}.yaml").write_text(yaml.safe_dump(arch.to_dict()))
    elif mode == "diverge":
        checks, check = [], search._check_logits_identical

        def nudged_on_rank1(model):  # at the second checkpoint rank 1 is 1e-3 off
            checks.append(1)
            if rank == 1 and len(checks) == 2:
                with torch.no_grad():
                    next(iter(model.arch_parameters())).add_(1e-3)
            check(model)

        search._check_logits_identical = nudged_on_rank1
        search.main({**cfg, "experiment": "diverge", "epochs": 2, "checkpoint_interval": 2})
    else:
        (out_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
        if mode == "hang":
            cfg["dist_timeout"] = 5.0
        args = [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]
        args += ["--epochs", "2", "--checkpoint-interval", "2", "--log-interval", "1"]
        args += ["--experiment", "hang" if mode == "hang" else "kill"]
        args += ["--resume", "auto"] if mode == "resume" else []
        from retrain.config import run_cli

        sys.exit(run_cli(search.main, search.DEFAULTS, args))
