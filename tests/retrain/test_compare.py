"""The comparison table: built from finished run directories alone, honest statistics, matched sizes."""

from __future__ import annotations

import csv
import json
import math
import signal
from pathlib import Path

import pytest
import yaml

from retrain import compare
from retrain.config import ConfigError


def _fake_run(
    run_dir: Path,
    model: str,
    seed: int,
    curve: list[float],
    params: int | None = 1000,
    epochs: int | None = None,
    results: bool = True,
) -> Path:
    """What ``retrain.train`` leaves behind: args.yaml, summary.csv and (when run by compare) results.json."""
    run_dir.mkdir(parents=True)
    args = {"model": model, "dataset": "synthetic", "img_size": 16, "epochs": epochs or len(curve), "seed": seed}
    (run_dir / "args.yaml").write_text(yaml.safe_dump(args))
    with open(run_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", "train_loss", "loss", "top1", "top5", "lr", "img_s"])
        w.writeheader()
        for e, top1 in enumerate(curve):
            w.writerow({"epoch": e, "train_loss": 1.0, "loss": 1.0, "top1": top1, "top5": 90, "lr": 1e-3, "img_s": 100})
    if results:
        res = {"params": params, "flops": 5_000_000, "train_img_s": 123.0, "top1": curve[-1], "interrupted": False}
        (run_dir / "results.json").write_text(json.dumps(res))
    return run_dir


def _cfg(tmp_path: Path, **kw) -> dict:
    cfg = {
        "output": str(tmp_path / "out"),
        "experiment": "cmp",
        "seeds": [0, 1, 2],
        "collect_only": True,
        "models": [
            {"name": "searched", "arch": "arch.yaml"},
            {"name": "vim", "model": "test_vim"},
            {"name": "fixed", "model": "test_local_fixed_vim"},
        ],
    }
    cfg.update(kw)
    return cfg


def _own_runs_cfg(tmp_path: Path, epochs: int, model: str, seeds: list[int]) -> dict:
    """A comparison that trains (not collect-only) one row 'vim' of ``model`` with a tiny synthetic recipe."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"dataset": "synthetic", "img_size": 16, "epochs": epochs}))
    return _cfg(tmp_path, collect_only=False, seeds=seeds, train_config=str(recipe),
                models=[{"name": "vim", "model": model}])  # fmt: skip


def _populate(tmp_path: Path, values: dict[str, list[float]], params: dict[str, int] | None = None) -> None:
    models = {"searched": "test_local_vim", "vim": "test_vim", "fixed": "test_local_fixed_vim"}
    for row, finals in values.items():
        for seed, final in enumerate(finals):
            run = tmp_path / "out" / "cmp" / "runs" / row / f"seed{seed}"
            _fake_run(run, models[row], seed, [final - 5, final], params=(params or {}).get(row, 1000))


def test_table_from_finished_runs_alone(tmp_path: Path) -> None:
    _populate(tmp_path, {"searched": [80.0, 81.0, 82.0], "vim": [70.0, 71.0, 72.0], "fixed": [80.5, 81.5, 80.0]})
    out = compare.main(_cfg(tmp_path))
    rows = {r["model"]: r for r in out["table"]}
    assert rows["searched"]["top1_mean"] == pytest.approx(81.0) and rows["searched"]["top1_std"] == pytest.approx(1.0)
    assert rows["vim"]["seeds"] == 3 and rows["vim"]["params"] == 1000 and rows["vim"]["train_img_s"] == 123.0
    md = Path(out["md"]).read_text()
    assert "| searched | vim | 10.00 | 1.00 | +10.0 | beats it by 10.0 σ |" in md
    assert "| searched | fixed | " in md and "within noise" in md
    assert Path(out["plot"]).stat().st_size > 1000
    with open(out["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [r["model"] for r in table] == ["searched", "vim", "fixed"] and table[0]["seeds"] == "3"


def test_final_vs_best_metric(tmp_path: Path) -> None:
    for seed in range(2):
        _fake_run(tmp_path / "out" / "cmp" / "runs" / "vim" / f"seed{seed}", "test_vim", seed, [50.0, 90.0, 60.0])
    cfg = _cfg(tmp_path, seeds=[0, 1], models=[{"name": "vim", "model": "test_vim"}])
    assert compare.main(cfg)["table"][0]["top1_mean"] == pytest.approx(60.0)
    assert compare.main({**cfg, "metric": "best"})["table"][0]["top1_mean"] == pytest.approx(90.0)


def test_runs_made_elsewhere_without_results_json(tmp_path: Path) -> None:
    """GPU runs copied back: only args.yaml + summary.csv; params/FLOPs are measured from the model they name."""
    dirs = [_fake_run(tmp_path / "gpu" / f"s{s}", "test_vim", s, [40.0, 50.0 + s], results=False) for s in (0, 1)]
    cfg = _cfg(
        tmp_path, seeds=[0, 1], models=[{"name": "vim", "model": "test_vim", "run_dirs": [str(d) for d in dirs]}]
    )
    row = compare.main(cfg)["table"][0]
    assert row["seeds"] == 2 and row["top1_mean"] == pytest.approx(50.5)
    assert row["params"] > 1000 and row["flops"] > 0 and row["train_img_s"] == 100.0


def test_unfinished_and_other_recipe_runs(tmp_path: Path) -> None:
    base = tmp_path / "out" / "cmp" / "runs" / "vim"
    _fake_run(base / "seed0", "test_vim", 0, [10.0, 20.0], epochs=5)  # 2 of 5 epochs: not counted
    _fake_run(base / "seed1", "test_vim", 1, [10.0, 30.0])
    cfg = _cfg(tmp_path, seeds=[0, 1], models=[{"name": "vim", "model": "test_vim"}])
    out = compare.main(cfg)
    assert out["table"][0]["seeds"] == 1
    assert "fewer seeds than asked" in out["markdown"]
    assert "ran another recipe: " in out["markdown"] and "epochs 2 (recipe 10)" in out["markdown"]


def test_own_runs_of_another_recipe_are_refused_unless_collecting(tmp_path: Path) -> None:
    """A rerun with a changed recipe finds its own finished runs made by the old one: training the rest beside them
    would label the table with a recipe they did not run, so it refuses in one line and writes nothing; collect-only
    tabulates them, flagged."""
    own = tmp_path / "out" / "cmp" / "runs"
    _fake_run(own / "vim" / "seed0", "test_vim", 0, [10.0, 20.0])  # 2 epochs, the old recipe
    _fake_run(own / "vim" / "seed1", "test_vim", 1, [10.0, 20.0, 30.0])  # the recipe asked for
    cfg = _own_runs_cfg(tmp_path, 3, "test_vim", [0, 1])
    with pytest.raises(ConfigError, match=r"1 run\(s\) of this comparison .* ran another recipe or model: vim seed 0 "
                                          r"\(epochs 2 \(recipe 3\)\); choose a new --experiment"):  # fmt: skip
        compare.main(cfg)
    assert not (tmp_path / "out" / "cmp" / "compare.yaml").exists()
    out = compare.main({**cfg, "collect_only": True})
    assert out["table"][0]["seeds"] == 2 and "ran another recipe: epochs 2 (recipe 3)" in out["markdown"]


def test_own_unfinished_runs_of_another_recipe_are_refused(tmp_path: Path) -> None:
    """An unfinished run of this comparison would resume in place; made with another recipe, it would finish under
    two recipes: refused in one line before anything is written, and its files are left as they were."""
    run = _fake_run(tmp_path / "out" / "cmp" / "runs" / "vim" / "seed0", "test_vim", 0, [10.0], epochs=5)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    cfg = _own_runs_cfg(tmp_path, 3, "test_vim", [0])
    msg = r"1 run\(s\) of this comparison .* another recipe or model: vim seed 0, unfinished \(epochs 5 \(recipe 3\)\);"
    with pytest.raises(ConfigError, match=msg):
        compare.main(cfg)
    assert not (tmp_path / "out" / "cmp" / "compare.yaml").exists()
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_size_mismatch_refused_or_flagged(tmp_path: Path) -> None:
    values = {"searched": [80.0, 81.0, 82.0], "vim": [70.0, 71.0, 72.0], "fixed": [80.0, 81.0, 82.0]}
    _populate(tmp_path, values, params={"searched": 1000, "vim": 1200, "fixed": 1050})
    with pytest.raises(ConfigError, match=r"vim 0\.001 M \(\+20 %\).*on_mismatch: flag"):
        compare.main(_cfg(tmp_path))
    out = compare.main(_cfg(tmp_path, on_mismatch="flag"))
    assert "+20.0 % ⚠ outside" in out["markdown"] and "+5.0 %" in out["markdown"]


def test_statistics() -> None:
    assert compare.pooled_std([1.0, 3.0], [2.0, 4.0]) == pytest.approx(math.sqrt(2.0))
    assert math.isnan(compare.pooled_std([1.0], [2.0, 3.0]))
    diff, z, words = compare.verdict([81.0, 82.0, 83.0], [80.0, 81.0, 82.0], 2.0)
    assert diff == pytest.approx(1.0) and z == pytest.approx(1.0) and words.startswith("within noise")
    assert compare.verdict([70.0, 71.0], [80.0, 81.0], 2.0)[2].startswith("loses to it by")
    assert compare.verdict([70.0], [80.0], 2.0)[2].startswith("cannot tell with 1 seed")


@pytest.mark.parametrize(
    "models,match",
    [
        ([{"name": "a", "modle": "test_vim"}], "unknown key 'modle'; did you mean 'model'"),
        ([{"name": "a", "model": "test_vim", "overrides": {"lr_rate": 1}}], "unknown key 'lr_rate'"),
        ([{"name": "a", "model": "test_vim"}, {"name": "a", "model": "test_vim"}], "share the name"),
        ([{"name": "s", "searched": True}], "no arch file is given"),
        ([{"name": "a", "model": "test_vim", "overrides": {"epochs": 9, "lr": 0.1}}], "epochs, lr belong to the"),
        ([{"name": "a", "model": "test_vim", "overrides": [1, 2]}], r"models\[0\]\.overrides must be a mapping of ret"),
        ([{"name": "a", "model": "test_vim", "overrides": "drop_path: 0.1"}], r"models\[0\]\.overrides must be a map"),
        ([{"name": ["a"], "model": "test_vim"}], r"models\[0\]\.name must be a single name, got \['a'\]"),
        ([{"name": "a", "model": ["test_vim"]}], r"models\[0\]\.model must be a single name"),
        ([{"name": "a", "arch": ["arch.yaml"]}], r"models\[0\]\.arch must be a single name"),
        ([{"name": "a", "arch": "arch.yaml", "searched": "no"}], r"models\[0\]\.searched must be true or false"),
        ([{"name": "a", "model": "test_vim", "run_dirs": "gpu/seed0"}], r"models\[0\]\.run_dirs must be a list of run"),
        ([{"name": "a", "model": "test_vim", "run_dirs": 5}], r"models\[0\]\.run_dirs must be a list of run folders"),
        (
            [{"name": "a", "model": "test_vimm"}],
            r"^models\[0\] \(a\): unknown model 'test_vimm'; did you mean 'test_vim'\?$",
        ),
        (
            [{"name": "a", "model": "zzqqxx"}],
            r"^models\[0\] \(a\): unknown model 'zzqqxx'; timm.list_models\(\) lists the",
        ),
    ],
)
def test_bad_rows_are_one_line_errors(tmp_path: Path, models: list, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        compare.main(_cfg(tmp_path, models=models))
    assert "\n" not in str(err.value)


def test_runs_missing_rows_then_collects_them(tmp_path: Path) -> None:
    """Not collect-only: a missing run is trained (tiny), saved with results.json, and found again next time."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "dataset": "synthetic",
                "num_samples": 64,
                "img_size": 16,
                "epochs": 1,
                "batch_size": 32,
                "warmup_epochs": 0,
            }
        )
    )
    cfg = _cfg(
        tmp_path,
        collect_only=False,
        seeds=[0],
        train_config=str(recipe),
        models=[{"name": "vim", "model": "test_vim"}, {"name": "fixed", "model": "test_local_fixed_vim"}],
        on_mismatch="flag",
    )
    out = compare.main(cfg)
    assert [r["seeds"] for r in out["table"]] == [1, 1]
    run = Path(cfg["output"]) / "cmp" / "runs" / "vim" / "seed0"
    assert (run / "results.json").is_file() and (run / "summary.csv").is_file()
    mtime = (run / "results.json").stat().st_mtime
    again = compare.main(cfg)  # everything is collected: nothing retrains
    assert (run / "results.json").stat().st_mtime == mtime
    assert again["table"][0]["top1_mean"] == out["table"][0]["top1_mean"]


def test_slws_ablation_adds_a_twin_without_shuffle(tmp_path: Path) -> None:
    runs = tmp_path / "out" / "cmp" / "runs"
    for row, finals, model in (
        ("searched", [80.0, 82.0], "test_local_vim"),
        ("searched_no_SLWS", [78.0, 79.0], "test_local_vim"),
        ("vim", [70.0, 71.0], "test_vim"),
    ):
        for seed, final in enumerate(finals):
            _fake_run(runs / row / f"seed{seed}", model, seed, [final])
    models = [
        {"name": "searched", "arch": "arch.yaml", "overrides": {"shuffle_max": 0.5}},
        {"name": "vim", "model": "test_vim"},
    ]
    out = compare.main(_cfg(tmp_path, seeds=[0, 1], slws_ablation=True, models=models))
    table = {r["model"]: r for r in out["table"]}
    assert list(table) == ["searched", "searched (no SLWS)", "vim"]
    assert table["searched (no SLWS)"]["role"] == "searched" and table["searched (no SLWS)"]["shuffle_max"] == 0.0
    assert table["searched"]["shuffle_max"] == 0.5 and table["searched (no SLWS)"]["top1_mean"] == pytest.approx(78.5)
    assert "| searched (no SLWS) | vim |" in out["markdown"] and "| searched | vim |" in out["markdown"]


def test_pick_gpu_spreads_runs_evenly():
    from retrain.compare import pick_gpu

    running = {"0": 0, "1": 0}
    picked = []
    for _ in range(5):
        g = pick_gpu(running)
        running[g] += 1
        picked.append(g)
    assert picked == ["0", "1", "0", "1", "0"]
    running = {"3": 2, "5": 1}
    assert pick_gpu(running) == "5"


def test_visible_gpus_empty_without_cuda(monkeypatch):
    import torch

    from retrain.compare import visible_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert visible_gpus() == []


def test_train_rows_trains_only_those_and_collects_the_rest(tmp_path: Path) -> None:
    """A comparison split over machines: this call trains 'vim' only; 'fixed' is collected (here: one finished run)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump({"dataset": "synthetic", "num_samples": 64, "img_size": 16, "epochs": 1, "batch_size": 32})
    )
    _fake_run(tmp_path / "out" / "cmp" / "runs" / "fixed" / "seed0", "test_local_fixed_vim", 0, [50.0])
    cfg = _cfg(
        tmp_path,
        collect_only=False,
        seeds=[0, 1],
        train_config=str(recipe),
        models=[{"name": "vim", "model": "test_vim"}, {"name": "fixed", "model": "test_local_fixed_vim"}],
        on_mismatch="flag",
        train_rows=["vim"],
    )
    out = compare.main(cfg)
    runs = Path(cfg["output"]) / "cmp" / "runs"
    assert (runs / "vim" / "seed0" / "results.json").is_file() and (runs / "vim" / "seed1" / "results.json").is_file()
    assert not (runs / "fixed" / "seed1").exists()  # not trained here
    assert [r["seeds"] for r in out["table"]] == [2, 1]
    with pytest.raises(ConfigError, match="train_rows: no row named 'vmamba'"):
        compare.main({**cfg, "train_rows": ["vmamba"]})


def test_collected_runs_of_a_fixed_shape_dataset_are_costed_without_its_files(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "elsewhere" / "seed0", "test_vim", 0, [70.0, 71.0], results=False)
    args = yaml.safe_load((run / "args.yaml").read_text())
    args.update(dataset="fashion_mnist", data_dir=str(tmp_path / "not_here.npz"), in_chans=0)
    (run / "args.yaml").write_text(yaml.safe_dump(args))
    got = compare.collect_run(run)
    assert got is not None and got["params"] and got["params"] > 0 and got["flops"] and got["flops"] > 0


def test_train_rows_brings_the_no_slws_twin_of_a_named_searched_row() -> None:
    cfg = {**compare.DEFAULTS, "slws_ablation": True,
           "models": [{"name": "searched", "arch": "arch.yaml", "overrides": {"shuffle_max": 0.5}},
                      {"name": "vim", "model": "test_vim"}]}  # fmt: skip
    rows = compare._parse_rows(cfg, {**compare.DEFAULTS, "shuffle_max": 0.0, "arch": "", "model": ""})
    assert [r.name for r in rows] == ["searched", "searched (no SLWS)", "vim"]
    assert [compare._trains(r, ["searched"]) for r in rows] == [True, True, False]
    assert [compare._trains(r, ["vim"]) for r in rows] == [False, False, True]
    assert all(compare._trains(r, []) for r in rows)


def test_side_by_side_runs_are_pinned_to_the_least_busy_gpu(tmp_path: Path, monkeypatch) -> None:
    import subprocess
    import threading

    monkeypatch.setattr(compare, "visible_gpus", lambda: ["2", "5"])
    seen, lock, gate = [], threading.Lock(), threading.Barrier(4)

    class FakeTraining:  # subprocess.Popen of a training that ends well once all four are in flight at once
        def __init__(self, cmd, stdout, stderr, env) -> None:
            with lock:
                seen.append(env["CUDA_VISIBLE_DEVICES"])

        def wait(self) -> int:
            gate.wait(timeout=10)
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeTraining)
    row = compare.Row("vim", {}, False)
    pending = [(row, s, {"seed": s}, tmp_path / "runs" / "vim" / f"seed{s}") for s in range(4)]
    (tmp_path / "runs" / "vim").mkdir(parents=True)
    compare._run_parallel(pending, jobs=4)
    assert sorted(seen) == ["2", "2", "5", "5"]


def test_a_sigterm_after_every_training_ended_stops_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    """Side by side: a SIGTERM that comes once every training has ended (here: as the last one returns) interrupts
    nothing, so the comparison goes on; one that comes while a training runs stops the comparison as interrupted."""
    import os
    import signal
    import subprocess

    monkeypatch.setattr(compare, "visible_gpus", lambda: [])
    codes = []

    class FakeTraining:  # subprocess.Popen of a training; the SIGTERM arrives as it ends
        def __init__(self, cmd, stdout, stderr, env) -> None:
            pass

        def send_signal(self, signum: int) -> None:
            pass

        def wait(self) -> int:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode of this thread
            return codes.pop(0)

    monkeypatch.setattr(subprocess, "Popen", FakeTraining)
    row = compare.Row("vim", {}, False)
    (tmp_path / "runs" / "vim").mkdir(parents=True)
    pending = [(row, 0, {"seed": 0}, tmp_path / "runs" / "vim" / "seed0")]
    codes[:] = [0]
    try:
        compare._run_parallel(pending, jobs=2)  # ended well: no interruption
    except KeyboardInterrupt:  # (uncaught, it would stop pytest itself)
        pytest.fail("a signal after every training had ended interrupted the comparison")
    assert "came after every training had finished" in capsys.readouterr().out
    codes[:] = [128 + signal.SIGTERM]  # the training itself stopped on the forwarded signal
    with pytest.raises(KeyboardInterrupt) as e:
        compare._run_parallel(pending, jobs=2)
    assert e.value.signum == signal.SIGTERM


def test_a_sigterm_delivered_to_a_worker_thread_is_passed_on_at_once(tmp_path: Path, monkeypatch) -> None:
    """The kernel may hand a process's SIGTERM to any thread; Python runs the handler in the main thread only. One
    delivered to a thread waiting on its training must still reach the trainings at once, not when one ends."""
    import signal
    import subprocess
    import threading
    import time

    monkeypatch.setattr(compare, "visible_gpus", lambda: [])
    stopped = threading.Event()

    class FakeTraining:  # a training that runs until it is signalled (or 20 s pass)
        def __init__(self, cmd, stdout, stderr, env) -> None:
            pass

        def send_signal(self, signum: int) -> None:
            stopped.set()

        def wait(self) -> int:
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # to this worker thread, not the main one
            return 128 + signal.SIGTERM if stopped.wait(timeout=20) else 0

    monkeypatch.setattr(subprocess, "Popen", FakeTraining)
    row = compare.Row("vim", {}, False)
    (tmp_path / "runs" / "vim").mkdir(parents=True)
    pending = [(row, 0, {"seed": 0}, tmp_path / "runs" / "vim" / "seed0")]
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        compare._run_parallel(pending, jobs=2)
    assert stopped.is_set() and time.monotonic() - t0 < 10


def test_side_by_side_progress_lines_are_written_whole(tmp_path: Path, monkeypatch) -> None:
    """Each '== start' / '== done' line of the trainings run side by side is one write (text and newline together):
    from two threads, print()'s separate writes could merge two lines into one."""
    import io
    import subprocess

    monkeypatch.setattr(compare, "visible_gpus", lambda: [])

    class FakeTraining:
        def __init__(self, cmd, stdout, stderr, env) -> None:
            pass

        def wait(self) -> int:
            return 0

    class Writes(io.StringIO):
        calls: list[str] = []

        def write(self, text: str) -> int:
            self.calls.append(text)
            return super().write(text)

    out = Writes()
    monkeypatch.setattr(subprocess, "Popen", FakeTraining)
    monkeypatch.setattr(compare.sys, "stdout", out)
    row = compare.Row("vim", {}, False)
    (tmp_path / "runs" / "vim").mkdir(parents=True)
    compare._run_parallel([(row, s, {"seed": s}, tmp_path / "runs" / "vim" / f"seed{s}") for s in range(2)], jobs=2)
    progress = [c for c in out.calls if c.startswith("== ")]
    assert len(progress) == 4 and all(c.endswith("\n") and c.count("\n") == 1 for c in progress), out.calls


def _tiny_recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"dataset": "synthetic", "num_samples": 64, "img_size": 16, "epochs": 1}))
    return recipe


def test_repeated_seeds_are_refused(tmp_path: Path, capsys) -> None:
    """A repeated seed is one run folder counted twice: a fake zero spread and an 'inf σ' verdict. Refused in one
    line, from the YAML and from the command line, before anything is written."""
    _populate(tmp_path, {"searched": [80.0, 81.0], "vim": [70.0, 71.0], "fixed": [80.5, 81.5]})
    with pytest.raises(ConfigError, match=r"^seeds lists 1 more than once; give each seed once") as err:
        compare.main(_cfg(tmp_path, seeds=[0, 1, 1]))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "cmp" / "comparison.md").exists()
    argv = ["--output", str(tmp_path / "out"), "--experiment", "cli", "--collect-only", "--seeds", "0", "0",
            "--models", "test_vim"]  # fmt: skip
    assert compare.cli(argv) == 2
    assert (
        capsys.readouterr().err == "error: seeds lists 0 more than once; give each seed once, e.g. seeds: [0, 1, 2]\n"
    )
    assert not (tmp_path / "out" / "cli").exists()


def test_csv_has_each_column_once(tmp_path: Path) -> None:
    _populate(tmp_path, {"searched": [80.0, 81.0, 82.0], "vim": [70.0, 71.0, 72.0], "fixed": [80.5, 81.5, 80.0]},
              params={"searched": 1000, "vim": 1000, "fixed": 1050})  # fmt: skip
    out = compare.main(_cfg(tmp_path))
    with open(out["csv"], newline="") as f:
        header, *lines = list(csv.reader(f))
    assert len(header) == len(set(header)) and header[-2:] == ["param_ratio", "size_ok"]
    assert all(len(line) == len(header) for line in lines) and len(lines) == 3
    fixed = dict(zip(header, lines[2]))
    assert float(fixed["param_ratio"]) == pytest.approx(1.05) and fixed["size_ok"] == "True"


def test_a_missing_run_dir_is_named(tmp_path: Path, monkeypatch) -> None:
    """A mistyped run_dirs entry is a one-line error naming the row and the folder, before anything is written;
    relative entries are read from the current folder."""
    monkeypatch.chdir(tmp_path)
    _fake_run(tmp_path / "gpu" / "vim" / "seed0", "test_vim", 0, [70.0])
    (tmp_path / "gpu" / "notes.txt").write_text("")
    for entry, what in (("gpu/vim/sed1", "does not exist"), ("gpu/notes.txt", "is not a folder")):
        models = [{"name": "fixed", "model": "test_local_fixed_vim"},
                  {"name": "vim", "model": "test_vim", "run_dirs": ["gpu/vim/seed0", entry]}]  # fmt: skip
        with pytest.raises(ConfigError) as err:
            compare.main(_cfg(tmp_path, seeds=[0, 1], models=models))
        msg = str(err.value)
        assert msg.startswith(
            f"models[1] (vim): run_dirs entry '{entry}' {what} ({(tmp_path / entry).resolve()}); give the run"
        )
        assert "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_written_line_names_only_the_files_written(tmp_path: Path, capsys) -> None:
    """No row with a finished run: no plot, and the 'written' line says so instead of naming a file it did not write
    (nor passes off one left by an earlier call as new)."""
    cfg = _cfg(tmp_path, seeds=[0], models=[{"name": "vim", "model": "test_vim"}])
    d = tmp_path / "out" / "cmp"

    def written() -> list[str]:
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("written: ")]

    out = compare.main(cfg)
    no_plot = f"written: {d / 'comparison.md'}, {d / 'comparison.csv'}; no comparison.png"
    assert written() == [f"{no_plot}: no row has a finished run to plot"]
    assert out["plot"] is None and not (d / "comparison.png").exists() and Path(out["csv"]).is_file()
    (d / "comparison.png").write_bytes(b"an earlier plot")
    compare.main(cfg)
    assert written() == [f"{no_plot} (the one there is from an earlier call): no row has a finished run to plot"]
    assert (d / "comparison.png").read_bytes() == b"an earlier plot"
    _fake_run(d / "runs" / "vim" / "seed0", "test_vim", 0, [70.0])
    out = compare.main(cfg)
    assert written() == [f"written: {d / 'comparison.md'}, {d / 'comparison.csv'}, {d / 'comparison.png'}"]
    assert out["plot"] == d / "comparison.png" and (d / "comparison.png").stat().st_size > 1000


def test_unknown_model_names_its_row_and_the_nearest_model(tmp_path: Path) -> None:
    """Collecting or training, an unknown model stops before anything is built or written, naming the row and the
    nearest registered model, without the arch-file hint that fits retrain.train's --model only."""
    models = [{"name": "vim", "model": "test_vim"}, {"name": "fixed", "model": "test_local_fixd_vim"}]
    for collect_only in (True, False):
        cfg = _cfg(tmp_path, collect_only=collect_only, seeds=[0], train_config=str(_tiny_recipe(tmp_path)))
        with pytest.raises(ConfigError) as err:
            compare.main({**cfg, "models": models})
        assert str(err.value) == (
            "models[1] (fixed): unknown model 'test_local_fixd_vim'; did you mean 'test_local_fixed_vim'?"
        )
    assert not (tmp_path / "out").exists()


def test_a_missing_arch_file_names_its_row(tmp_path: Path, capsys) -> None:
    models = [{"name": "vim", "model": "test_vim"}, {"name": "mine", "arch": str(tmp_path / "nope.yaml")}]
    cfg = _cfg(tmp_path, collect_only=False, seeds=[0], train_config=str(_tiny_recipe(tmp_path)), models=models)
    with pytest.raises(ConfigError, match=r"^row 'mine': arch file not found: .*nope\.yaml") as err:
        compare.main(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_training_is_one_line_with_the_signal_status(
    tmp_path: Path, monkeypatch, capsys, signum: int, status: int
) -> None:
    """Ctrl-C (or SIGTERM) during a row's training: retrain.train saves its checkpoint and returns interrupted; the
    CLI says in one line where it stopped and that a rerun continues, no traceback, and exits as the shell would."""
    from retrain import train

    def stopped(cfg: dict) -> dict:  # what retrain.train.main returns when a signal stops it
        (Path(cfg["output"]) / cfg["experiment"]).mkdir(parents=True, exist_ok=True)
        return {"interrupted": True, "signal": int(signum), "top1": 10.0}

    monkeypatch.setattr(train, "main", stopped)
    argv = ["--output", str(tmp_path / "out"), "--experiment", "cmp", "--train-config", str(_tiny_recipe(tmp_path)),
            "--models", "test_vim", "--seeds", "0", "1"]  # fmt: skip
    try:
        got = compare.cli(argv)
    except KeyboardInterrupt as e:  # caught here: escaping, it would stop the whole test session
        pytest.fail(f"KeyboardInterrupt escaped the CLI: {e!r}")
    assert got == status
    assert capsys.readouterr().err == (
        "interrupted: test_vim seed 0 was interrupted; rerun the same command to continue\n"
    )
    runs = tmp_path / "out" / "cmp" / "runs" / "test_vim"
    assert json.loads((runs / "seed0" / "results.json").read_text())["interrupted"] is True
    assert not (runs / "seed1").exists()  # stopped there, not carried on to the next seed


@pytest.mark.parametrize(("epochs", "words"), [(1, "1 epoch,"), (2, "2 epochs,")])
def test_recipe_line_counts_epochs_in_words(epochs: int, words: str) -> None:
    cfg = {**compare.DEFAULTS, "experiment": "cmp", "seeds": [0]}
    md = compare._markdown([], cfg, {"dataset": "synthetic", "epochs": epochs, "img_size": 16}, "vim")
    assert f"(dataset synthetic, {words} img 16)" in md


def test_own_runs_of_another_model_are_refused_or_left_out(tmp_path: Path) -> None:
    """A rerun whose row now names another model finds the old model's finished runs in the row's folder: they are
    never tabulated under the row (refused in one line before anything is written; left out, with a note, when
    only collecting)."""
    _fake_run(tmp_path / "out" / "cmp" / "runs" / "vim" / "seed0", "test_vim", 0, [10.0, 20.0])
    cfg = _own_runs_cfg(tmp_path, 2, "test_vmamba", [0])
    msg = r"ran another recipe or model: vim seed 0 trained another model \(model 'test_vim' \(row 'test_vmamba'\)\)"
    with pytest.raises(ConfigError, match=msg):
        compare.main(cfg)
    assert not (tmp_path / "out" / "cmp" / "compare.yaml").exists()
    out = compare.main({**cfg, "collect_only": True})
    assert out["table"][0]["seeds"] == 0
    assert "trained another model, left out: model 'test_vim' (row 'test_vmamba')" in out["markdown"]
    same = compare.main({**cfg, "collect_only": True, "models": [{"name": "vim", "model": "test_vim"}]})
    assert same["table"][0]["seeds"] == 1 and "another model" not in same["markdown"]


def test_a_rederived_arch_file_does_not_inherit_the_old_archs_runs(tmp_path: Path) -> None:
    """The arch a run trained is read from its checkpoint's record: an arch file derived again into the same path
    (other orders) no longer matches the runs made from it, and a row's model kwargs are compared too."""
    import timm

    import supernet
    from retrain.checkpoint import save_checkpoint
    from search_spaces import save_arch

    torch = pytest.importorskip("torch")
    search = timm.create_model("test_local_vim_search")
    old = supernet.derive_arch(search)
    with torch.no_grad():  # another top-k: the first layer prefers other candidates
        search.arch_parameters()[0].copy_(torch.arange(search.arch_parameters()[0].numel(), dtype=torch.float))
    new = supernet.derive_arch(search)
    assert old.to_dict()["layers"] != new.to_dict()["layers"]
    arch_file = tmp_path / "arch.yaml"
    save_arch(old, arch_file)
    run = _fake_run(tmp_path / "out" / "cmp" / "runs" / "mine" / "seed0", "", 0, [10.0, 20.0])
    args = yaml.safe_load((run / "args.yaml").read_text())
    (run / "args.yaml").write_text(yaml.safe_dump({**args, "arch": str(arch_file), "shuffle_max": 0.5}))
    spec = {"name": old.model, "kwargs": {}, "arch": old.to_dict()}
    save_checkpoint({"kind": "retrain", "model": old.model, "model_spec": spec}, run / "last.pt")
    rows = [{"name": "mine", "arch": str(arch_file), "overrides": {"shuffle_max": 0.5}}]
    cfg = _cfg(tmp_path, seeds=[0], models=rows)
    assert compare.main(cfg)["table"][0]["seeds"] == 1  # the arch it was trained with

    save_arch(new, arch_file, overwrite=True)  # derived again into the same file
    out = compare.main(cfg)
    assert (
        out["table"][0]["seeds"] == 0
        and "trained another model, left out: arch layer blocks.0 orders" in out["markdown"]
    )
    save_arch(old, arch_file, overwrite=True)
    out = compare.main({**cfg, "models": [{**rows[0], "overrides": {"shuffle_max": 0.1}}]})
    assert out["table"][0]["seeds"] == 0 and "shuffle_max 0.5 (row 0.1)" in out["markdown"]
