"""The throughput benchmark's model rows and target ratios (the timing itself needs a GPU)."""

from __future__ import annotations

import pytest
import torch

from supernet.bench import DEFAULT_MODELS, _build, main, ratios_of


def test_child_rows_use_the_supernets_arch_at_both_widths():
    """The benchmark's K=4 child is built from the supernet's derived arch: by default at the supernet's width, and at
    the registered child's width (192) when the row asks for it."""
    torch.manual_seed(0)
    narrow = _build("local_vim_tiny", {}, 224)
    torch.manual_seed(0)
    registered = _build("local_vim_tiny", {"embed_dim": 192}, 224)
    assert (narrow.embed_dim, registered.embed_dim) == (128, 192)
    assert narrow.arch.orders == registered.arch.orders and len(narrow.arch.orders) == 20
    assert all(len(layer) == 4 for layer in narrow.arch.orders)
    assert ("local_vim_tiny", {"embed_dim": 192}) in DEFAULT_MODELS


def test_ratios_against_both_children():
    def row(step_ms, mem):
        return {"step_ms": step_ms, "peak_mem_gib": mem, "img_per_s": 128e3 / step_ms}

    by = {
        "deit_tiny_patch16_224": row(16.0, 2.0),
        "vim_tiny": row(40.0, 8.0),
        "local_vim_tiny": row(50.0, 8.0),
        "local_vim_tiny[embed_dim=192]": row(80.0, 10.0),
        "local_vim_tiny_search[mix=softmax]": row(100.0, 9.0),
        "local_vim_tiny_search[mix=hard]": row(25.0, 3.0),
    }
    r = ratios_of(by)
    assert r["vim_tiny / deit_tiny img/s (target >= 0.75)"] == 16.0 / 40.0
    assert r["supernet[softmax] / child step time, defaults (target <= 1.6)"] == 2.0
    assert r["supernet[softmax] / registered child (embed_dim 192) step time"] == 100.0 / 80.0
    assert r["supernet[softmax] / registered child (embed_dim 192) peak memory"] == 0.9
    assert r["supernet[hard] / registered child (embed_dim 192) step time"] == 25.0 / 80.0
    del by["local_vim_tiny[embed_dim=192]"]
    assert not any("registered child" in k for k in ratios_of(by))


def test_bench_refuses_unknown_channel_sums(capsys):
    with pytest.raises(SystemExit):
        main(["--scan-sums", "exact"])
    assert "invalid choice: 'exact'" in capsys.readouterr().err
