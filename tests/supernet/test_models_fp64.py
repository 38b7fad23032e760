"""A model cast to fp64 runs in fp64 end to end (the scan on the reference), so gradcheck works on it."""

from __future__ import annotations

import pytest
import torch
from supernet_testutils import build


@pytest.mark.parametrize("name", ["test_vim", "test_local_vim_search", "test_vmamba"])
def test_an_fp64_model_passes_gradcheck(name: str) -> None:
    """Logits in fp64 that match the fp32 model's, and gradcheck of the input gradient (a random projection of the
    Jacobian, which an fp32 residual stream fails)."""
    torch.manual_seed(7)
    size = 16 if "vim" in name else 32
    model = build(name, img_size=size, num_classes=3).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        want = model(x)
    model.double()
    x64 = x.double().requires_grad_()
    got = model(x64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-5)
    assert torch.autograd.gradcheck(model, (x64,), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
    got.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in model.parameters())


@pytest.mark.parametrize("name", ["test_vim", "test_vmamba"])
def test_an_fp64_models_scan_parameters_pass_gradcheck(name: str) -> None:
    """The first mixer's A_log, D and Δ bias, which the scan takes in fp32 in other models, stay fp64 here (their
    gradients are ~1e-8, hence the tight atol; and a step of 1e-4, since at gradcheck's 1e-6 the central difference's
    rounding, ~1e-16 / 1e-6 of an O(1) output, is ~1 % of such a gradient and failed or passed with the summation
    order)."""
    torch.manual_seed(8)
    size = 16 if "vim" in name else 32
    model = build(name, img_size=size, num_classes=3).eval().double()
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    prefix = next(n for n, m in model.named_modules() if type(m).__name__ == "MultiOrderMixer")
    names = [f"{prefix}.{p}" for p in ("A_log", "D", "dt_proj_bias")]
    params = dict(model.named_parameters())
    leaves = tuple(params[n].detach().clone().requires_grad_() for n in names)

    def run(*ts):
        return torch.func.functional_call(model, dict(zip(names, ts)), (x,))

    assert torch.autograd.gradcheck(run, leaves, eps=1e-4, atol=1e-11, rtol=1e-4, fast_mode=True)


def test_a_search_models_arch_logits_pass_gradcheck_in_fp64() -> None:
    """A supernet's merge weights (softmax of the arch logits) stay fp64 too."""
    torch.manual_seed(10)
    model = build("test_local_vim_search", img_size=16, num_classes=3).eval().double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters() if n.endswith("arch_logits")][:2]
    params = dict(model.named_parameters())
    leaves = tuple(params[n].detach().clone().requires_grad_() for n in names)

    def run(*ts):
        return torch.func.functional_call(model, dict(zip(names, ts)), (x,))

    assert torch.autograd.gradcheck(run, leaves, eps=1e-6, atol=1e-10, rtol=1e-4, fast_mode=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["test_vim", "test_local_vim_search", "test_vmamba"])
def test_an_fp64_model_on_the_gpu_runs_the_reference_in_fp64(name: str) -> None:
    """On a GPU, ``auto`` sends fp64 to the reference: the same logits and gradients as on the CPU."""
    torch.manual_seed(9)
    size = 16 if "vim" in name else 32
    model = build(name, img_size=size, num_classes=3).eval().double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    outs = []
    for dev in ("cpu", "cuda"):
        model.to(dev).zero_grad(set_to_none=True)
        y = model(x.to(dev))
        y.square().sum().backward()
        outs.append([t.detach().cpu().clone() for t in (y, *(p.grad for p in model.parameters()))])
    for a, b in zip(*outs):
        assert b.dtype == torch.float64
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)
