"""scripts/ncu_summary.py on a small Nsight Compute SASS source page: stall shares, opcodes, uncoalesced accesses."""

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "scripts" / "ncu_summary.py"
_spec = importlib.util.spec_from_file_location("ncu_summary", _PATH)
ncu_summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ncu_summary)

_CSV = """"Kernel Name","_scan_bwd_nd_kernel",
"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","Instructions Executed","stall_long_sb","stall_wait","stall_long_sb (Not Issued)","L2 Theoretical Sectors Global","L2 Theoretical Sectors Global Excessive"
"0x10","  SHFL.BFLY PT, R3, R2, 0x10, 0x1f","30","20","1,000","0","30","0","0","0"
"0x20","@P0   LDG.E.128 R4, desc[UR4][R8.64]","10","10","100","4","6","4","800","400"
"0x30","  SHF.L.U32 R5, R4, 0x10, RZ","60","60","100","60","0","60","0","0"
"0x40","  STG.E desc[UR4][R8.64], R5","0","0","50","0","0","0","200","0"
"""  # noqa: E501


@pytest.mark.parametrize("gz", [False, True])
def test_summary_shares_opcodes_and_excess_sectors(tmp_path, gz):
    path = tmp_path / ("page.csv.gz" if gz else "page.csv")
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(_CSV)
    else:
        path.write_text(_CSV)
    s = ncu_summary.summarize(str(path), top=2)
    assert s["instructions"] == 4 and s["samples"] == 100 and s["executed"] == 1250
    assert s["stall_share"] == pytest.approx({"long_sb": 64 / 100, "wait": 36 / 100})  # Not-issued columns left out
    ops = {o["opcode"]: o for o in s["opcodes"]}
    assert list(ops) == ["SHF", "SHFL", "LDG", "STG"]  # by samples; the predicate and modifiers stripped
    assert ops["SHFL"]["executed"] == 1000 and ops["SHF"]["sample_share"] == pytest.approx(0.6)
    assert [r["address"] for r in s["top_stalled"]["long_sb"]] == ["0x30", "0x20"]
    assert s["top_excess_sectors"] == [
        {"address": "0x20", "source": "@P0 LDG.E.128 R4, desc[UR4][R8.64]", "sectors": 800, "excess": 400}
    ]


def test_main_writes_json_and_bad_input_is_one_line(tmp_path, capsys):
    page = tmp_path / "page.csv"
    page.write_text(_CSV)
    out = tmp_path / "s.json"
    assert ncu_summary.main([str(page), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["stall_share"]["long_sb"] == pytest.approx(0.64)
    assert "long_sb 64.0%" in capsys.readouterr().out
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    (tmp_path / "two.csv").write_text(_CSV + _CSV)  # two kernels in one page
    (tmp_path / "blank.csv").write_text(_CSV.replace('"0x30"', '\n"0x30"'))  # a blank line inside: skipped
    assert ncu_summary.main([str(tmp_path / "blank.csv")]) == 0
    capsys.readouterr()
    for arg, start in ((tmp_path / "missing.csv", "error: "), (tmp_path / "other.csv", "error: "),
                       (tmp_path / "two.csv", "error: ")):  # fmt: skip
        assert ncu_summary.main([str(arg)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(start) and err.count("\n") == 1, err
