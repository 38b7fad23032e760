"""Run many CLI invocations as ``python -m MODULE ARGS...`` processes, paying the heavy imports once.

``python cli_runner.py CASES.json RESULTS.json``: CASES is a list of ``{"id", "module", "argv", "cwd"}``. The runner
imports torch, timm and the model zoo, then forks one child per case; the child runs the module as ``__main__``
exactly as ``python -m`` does (``runpy``), with its stdout and stderr in files, and the parent records the exit status
and both outputs. The CLIs' own modules are not imported before the fork, so each child executes them fresh.
Set ``RELIABILITY_PLAIN_SUBPROCESS=1`` to start a new interpreter per case instead (slower, same results).
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback


def _child(case: dict, out_path: str, err_path: str) -> None:
    out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err_fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    os.chdir(case["cwd"])
    sys.argv = [case["module"], *case["argv"]]
    code = 0
    try:
        runpy.run_module(case["module"], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # what the interpreter would do: the traceback, then exit status 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_forked(case: dict, timeout: float) -> tuple[int, str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        pid = os.fork()
        if pid == 0:
            try:
                _child(case, out_path, err_path)
            finally:
                os._exit(70)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return -9, "", f"timed out after {timeout} s"
            time.sleep(0.01)
        code = os.waitstatus_to_exitcode(status)
        with open(out_path) as f_out, open(err_path) as f_err:
            return code, f_out.read(), f_err.read()


def _run_plain(case: dict, timeout: float) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", case["module"], *case["argv"]],
        cwd=case["cwd"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr


def main(cases_path: str, results_path: str) -> None:
    with open(cases_path) as f:
        cases = json.load(f)
    plain = os.environ.get("RELIABILITY_PLAIN_SUBPROCESS") == "1"
    if not plain:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
        import timm  # noqa: F401
        import torch  # noqa: F401
        import yaml  # noqa: F401

        import supernet  # noqa: F401  (the model zoo, the kernels and the search spaces)
    results = {}
    for case in cases:
        t0 = time.perf_counter()
        code, out, err = (_run_plain if plain else _run_forked)(case, timeout=60.0)
        results[case["id"]] = {"code": code, "stdout": out, "stderr": err, "seconds": time.perf_counter() - t0}
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
