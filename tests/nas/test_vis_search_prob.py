"""Derivation: top-k per layer under the space's constraint, the arch file, plots, determinism, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from nas import vis_search_prob as vsp
from search_spaces import load_arch, load_space


def _fake_run(tmp_path: Path, space: str = "localmamba", epochs: int = 3, depth: int = 3) -> Path:
    """A search run directory with only ``arch_probs.jsonl`` and ``args.yaml`` (what a search writes per epoch)."""
    sp = load_space(space)
    run = tmp_path / "run"
    run.mkdir()
    n = sp.num_candidates
    lines = []
    for e in range(epochs):
        probs = []
        for layer in range(depth):
            # Windowed orders win more and more, so the constraint (if any) must pull a global order back in.
            raw = [1.0 + (e + 1) * (2.0 if not sp.global_mask[j] else 0.1) * ((j + layer) % n + 1) for j in range(n)]
            s = sum(raw)
            probs.append([r / s for r in raw])
        lines.append(
            json.dumps(
                {
                    "epoch": e,
                    "labels": [f"blocks.{i}" for i in range(depth)],
                    "candidates": list(sp.candidates),
                    "probs": probs,
                }
            )
        )
    (run / "arch_probs.jsonl").write_text("\n".join(lines) + "\n")
    (run / "args.yaml").write_text(yaml.safe_dump({"search_space": space, "dataset": "synthetic"}))
    return run


def test_derive_from_jsonl_writes_arch_plots_and_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _fake_run(tmp_path, "extended")
    out = vsp.main({"source": str(run)})
    arch = load_arch(out["arch_path"])
    space = load_space("extended")
    assert arch.space.candidates == space.candidates and arch.depth == 3
    for layer in arch.layers:
        assert len(layer.orders) == space.k
        assert sum(space.global_mask[space.index(o)] for o in layer.orders) >= space.min_global
        assert list(layer.orders) == sorted(layer.orders, key=space.index)
    assert arch.provenance["checkpoint"] == "arch_probs.jsonl" and arch.provenance["epoch"] == 2
    assert Path(out["heatmap"]).stat().st_size > 1000 and Path(out["trajectory"]).stat().st_size > 1000
    text = capsys.readouterr().out
    assert "blocks.2" in text and "retrain.train --arch" in text and text.rstrip().endswith(out["command"])


def test_constraint_pulls_in_a_global_order(tmp_path: Path) -> None:
    # Every window beats every global order here, yet min_global=1 must keep one.
    run = _fake_run(tmp_path, "extended")
    arch = vsp.main({"source": str(run / "arch_probs.jsonl"), "quiet": True, "plots": False})["arch"]
    space = load_space("extended")
    for layer in arch.layers:
        top = sorted(range(space.num_candidates), key=lambda i: -layer.probs[i])[: space.k]
        assert all(not space.global_mask[i] for i in top)  # unconstrained top-k would hold no global order
        assert sum(space.global_mask[space.index(o)] for o in layer.orders) == 1


def test_k_override_and_range(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    arch = vsp.main({"source": str(run), "k": 2, "quiet": True, "plots": False})["arch"]
    assert all(len(layer.orders) == 2 for layer in arch.layers) and arch.space.k == 2
    with pytest.raises(ValueError, match=r"--k 9 is out of range .* use 1\.\.8"):
        vsp.main({"source": str(run), "k": 9, "out": str(tmp_path / "a.yaml"), "quiet": True})


def test_deterministic_and_refuses_to_overwrite(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    first = vsp.main({"source": str(run), "out": str(tmp_path / "a.yaml"), "quiet": True})
    second = vsp.main({"source": str(run), "out": str(tmp_path / "b.yaml"), "quiet": True})
    assert Path(first["arch_path"]).read_text() == Path(second["arch_path"]).read_text()
    with pytest.raises(ValueError, match="exists; choose another --out or pass --overwrite"):
        vsp.main({"source": str(run), "out": str(tmp_path / "a.yaml"), "quiet": True})
    vsp.main({"source": str(run), "out": str(tmp_path / "a.yaml"), "overwrite": True, "quiet": True})


@pytest.mark.parametrize(
    "setup,argv_extra,match",
    [
        ("missing", [], "not found: "),
        ("empty_dir", [], "holds neither a search checkpoint"),
        ("corrupt", [], "truncated, corrupt"),
        ("ok", ["--k", "0"], "--k 0 is out of range"),
    ],
)
def test_cli_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, setup: str, argv_extra: list[str], match: str
) -> None:
    if setup == "missing":
        source = tmp_path / "nope"
    elif setup == "empty_dir":
        source = tmp_path / "empty"
        source.mkdir()
    elif setup == "corrupt":
        source = tmp_path / "run" / "last.pt"
        source.parent.mkdir()
        source.write_bytes(b"not a checkpoint at all")
    else:
        source = _fake_run(tmp_path)
    assert vsp.cli([str(source), *argv_extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and "\n" not in err


def test_tiny_search_checkpoint_derives_a_buildable_arch(tmp_path: Path) -> None:
    """End to end with the real search: its checkpoint -> an arch file the model zoo builds."""
    import supernet
    from nas import search
    from retrain.config import resolve_config

    overrides = {"model": "test_local_vim_search", "dataset": "synthetic", "num_samples": 64, "img_size": 16}
    overrides.update({"epochs": 2, "batch_size": 16, "arch_warmup_epochs": 0, "warmup_epochs": 0, "log_interval": 1000})
    cfg = resolve_config(search.DEFAULTS, overrides={**overrides, "output": str(tmp_path), "experiment": "search"})
    out = search.main(cfg)
    run_dir = Path(out["run_dir"])
    derived = vsp.main({"source": str(run_dir), "quiet": True})
    arch = load_arch(derived["arch_path"])
    assert arch.provenance["checkpoint"] == "last.pt" and arch.provenance["epoch"] == 1
    assert arch.model == out["derived_model_name"] and [layer.label for layer in arch.layers] == out["labels"]
    for layer in arch.layers:  # the probabilities are the search's own, read back through the model
        assert layer.probs == pytest.approx(out["arch_probs"][layer.label], abs=1e-6)
    model = supernet.create_derived(arch, img_size=16, num_classes=10)
    assert model.arch_labels() == out["labels"]
    again = vsp.main({"source": str(run_dir / "last.pt"), "out": str(tmp_path / "again.yaml"), "quiet": True})
    assert load_arch(again["arch_path"]).orders == arch.orders
    assert "--dataset synthetic" not in derived["command"] and "--img-size 16" in derived["command"]
