"""The wheel a `pip install` builds: every module and data file of the source tree, usable outside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("search_spaces", "kernels", "supernet", "nas", "retrain")


def test_wheel_carries_every_module_and_preset(tmp_path: Path) -> None:
    # Built from a copy without build outputs: a stale build/ or egg-info would hide a file the config leaves out, and
    # the build writes nothing into the checkout.
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "demo_runs", "runs", "benchmarks")
    shutil.copytree(ROOT, src, ignore=skip)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("scan_nas-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {
        p.relative_to(ROOT).as_posix()
        for pkg in PACKAGES
        for p in (ROOT / pkg).rglob("*")
        if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts
    }
    assert want - names == set(), f"missing from the wheel: {sorted(want - names)}"

    # Installed from the wheel alone (a pure-Python wheel unpacks as is), outside the source tree.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import search_spaces, supernet, timm\n"
        f"assert search_spaces.__file__.startswith({str(site)!r}), search_spaces.__file__\n"
        "from search_spaces import load_space, scan_order\n"
        "for name in ('vim', 'vmamba', 'localmamba', 'extended'):\n"
        "    space = load_space(name)\n"
        "    [scan_order(c, 4, 6) for c in space.candidates]\n"
        "timm.create_model('test_local_vim_search', img_size=16)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
