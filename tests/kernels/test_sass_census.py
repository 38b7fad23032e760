"""scripts/sass_census.py: the SASS parser, its one-line errors, and one real compile for sm_90 (no GPU needed)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "scripts" / "sass_census.py"
_spec = importlib.util.spec_from_file_location("sass_census", _PATH)
sass_census = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sass_census)

_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   FFMA R2, R0, R0, R1 ;
        /*0030*/                   SHFL.BFLY PT, R3, R2, 0x10, 0x1f ;
        /*0040*/              @!P0 MUFU.EX2 R4, R3 ;
        /*0050*/               @P1 BRA 0x20 ;
        /*0060*/                   STG.E [R6.64], R4 ;
        /*0070*/                   EXIT ;
"""


def test_census_counts_by_class_and_finds_the_loop():
    whole = sass_census.census(_SASS)
    assert whole["total"] == 8
    assert (whole["shfl"], whole["mufu"], whole["fp32"], whole["stg"], whole["mov"]) == (1, 1, 1, 1, 2)
    loops = sass_census.loops(_SASS)
    assert [(a, b) for a, b, _ in loops] == [(0x20, 0x50)]
    assert sass_census.census(loops[0][2])["total"] == 4  # FFMA, SHFL, MUFU, BRA


@pytest.mark.parametrize(
    "argv, start",
    [
        (["--config", "8,32,1"], "error: --config needs"),
        (["--config", "8,x,1,4,32,1,4"], "error: --config needs"),
        (["--config", "8,32,1,4,32,1,4,0,1,0,128,0,0"], "error: --config needs"),
        (["--config", "8,32,1,4,32,1,4,0,1,0,300"], "error: --config needs"),
        (["--config", "8,32,1,4,32,1,4", "--n", "0"], "error: --config needs"),
        (["--config", "8,32,1,4,32,1,4", "--json", "/nonexistent-dir/x.json"], "error: --json"),
    ],
)
def test_bad_arguments_are_one_line_errors(capsys, argv, start):
    assert sass_census.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(start)


def test_compiles_the_n1_backward_for_sm90(tmp_path):
    """A real compile, in a fresh process: the tests run Triton's interpreter, which cannot compile for a target."""
    pytest.importorskip("triton.backends.nvidia")
    if not os.path.exists(sass_census._tool_path("cuobjdump")):
        pytest.skip("Triton's cuobjdump is not installed")
    out = tmp_path / "census.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(_PATH.parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(_PATH), "--n", "1", "--config", "4,32,1,32,32,1,1,1,1", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())
    assert row["arch"] == "sm_90" and row["registers"] > 0
    assert row["whole"]["mufu"] > 0 and row["loops"]
    # N = 1 takes the reduce-scatter of dB/dC (LANE_SUM): butterfly sums of its 4 rows would take 40 shuffles
    assert 0 < row["whole"]["shfl"] < 40
    # The 11th config number reaches the compiler as maxnreg: the 8-step N = 1 backward holds 206-209 registers
    # uncapped (Triton 3.6-3.8 for sm_90), so 128 or fewer means the cap was applied.
    cmd[cmd.index("--config") + 1] = "8,32,1,32,32,1,1,1,1,0,128"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 0 < json.loads(out.read_text())["registers"] <= 128
    # N = 16 sums dB/dC as fixed point by redux.sync (32 rows per group: 2 x 32 sums and 2 maxima), no shuffles;
    # with --butterfly-sums, 2 x 32 rows x 5 butterfly stages of shuffles
    cmd[cmd.index("--n") + 1], cmd[cmd.index("--config") + 1] = "16", "8,32,1,4,32,1,4,0,1"
    for extra, redux, shfl in (([], 66, 0), (["--butterfly-sums"], 0, 320)):
        proc = subprocess.run(cmd + extra, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        row = json.loads(out.read_text())
        assert (row["whole"]["redux"], row["whole"]["shfl"], row["fixed_sums"]) == (redux, shfl, not extra), row
    cmd[cmd.index("--n") + 1] = "1"
    # The forward compiles too (every constexpr of the kernel is given one)
    cmd[cmd.index("--config") + 1 : cmd.index("--config") + 2] = ["4,32,1,32,32,1,1,1,1", "--kernel", "fwd"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())
    assert row["kernel"] == "fwd" and row["registers"] > 0 and row["whole"]["mufu"] > 0
