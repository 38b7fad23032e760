"""torch.compile of this package's models: Inductor's options, and compiled against eager on a GPU."""

from __future__ import annotations

import pytest
import timm
import torch
from supernet_testutils import build

from supernet import compile_model, compile_options


@pytest.mark.parametrize("mode", [None, "reduce-overhead", "max-autotune"])
def test_compile_options_turn_layout_optimization_off_for_our_models_only(mode) -> None:
    ours = compile_options(build("test_vmamba", img_size=32), mode)["options"]
    import torch._inductor

    assert ours == {**torch._inductor.list_mode_options(mode or "default"), "layout_optimization": False}
    assert compile_options(timm.create_model("resnet10t", num_classes=4), mode) == {"mode": mode}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["test_vmamba", "test_local_vim_search"])
def test_compiled_model_matches_eager_on_the_gpu(name: str) -> None:
    """compile_model (Inductor, the Triton kernels as registered ops) against eager mode, bf16 autocast: logits and
    every gradient."""
    torch.manual_seed(3)
    torch._dynamo.reset()
    model = build(name, img_size=32, num_classes=5).cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    out = []
    for fn in (model, compile_model(model)):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x)
        y.float().square().mean().backward()
        out.append((y.float(), {k: p.grad.float().clone() for k, p in model.named_parameters()}))
    (y0, g0), (y1, g1) = out
    torch.testing.assert_close(y1, y0, rtol=3e-2, atol=3e-2)
    for k in g0:
        scale = g0[k].abs().max().clamp_min(1e-6)
        assert (g1[k] - g0[k]).abs().max() / scale < 0.05, k


def test_module_compile_of_our_models_takes_the_same_options(monkeypatch) -> None:
    """``model.compile(mode=...)`` (nn.Module's own) turns the layout optimization off too; another backend or
    explicit options pass through as given."""
    import torch._inductor

    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, *args, **kwargs: calls.append(kwargs) or fn)
    model = build("test_vmamba", img_size=32)
    model.compile(mode="reduce-overhead")
    model.compile()
    model.compile(backend="aot_eager")
    model.compile(options={"max_autotune": True})
    off = {"layout_optimization": False}
    assert calls == [
        {"options": {**torch._inductor.list_mode_options("reduce-overhead"), **off}},
        {"options": {**torch._inductor.list_mode_options("default"), **off}},
        {"backend": "aot_eager"},
        {"options": {"max_autotune": True}},
    ]


def test_module_compile_runs() -> None:
    torch._dynamo.reset()
    model = build("test_vim", img_size=16, num_classes=3)
    x = torch.randn(2, 3, 16, 16)
    want = model(x)
    model.compile(backend="aot_eager")
    torch.testing.assert_close(model(x), want)
