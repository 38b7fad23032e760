"""The hierarchical family's LayerNorm module: nn.LayerNorm's parameters and dtypes, kernels.layer_norm underneath,
and the block norms that feed a GEMM writing the GEMM's dtype under autocast."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

import supernet  # noqa: F401  (registers the models)
from supernet.mixer import LayerNorm, gemm_input_dtype


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_layer_norm_module_is_nn_layer_norm(backend: str) -> None:
    gen = torch.Generator().manual_seed(0)
    ref = nn.LayerNorm(24)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(24, generator=gen))
        ref.bias.copy_(torch.randn(24, generator=gen))
    ours = LayerNorm(24, backend=backend)
    ours.load_state_dict(ref.state_dict())  # same keys, same shapes
    assert isinstance(ours, nn.LayerNorm) and list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(3, 7, 24, generator=gen)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    for x_dtype in (torch.float32, torch.bfloat16):  # the dtype nn.LayerNorm gives under the CPU's autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = ours(x.to(x_dtype)), ref(x.to(x_dtype))
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert ours(x, gemm_input_dtype(x)).dtype == torch.bfloat16
    assert gemm_input_dtype(x) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_cuda_layer_norm_module_follows_cuda_autocast(x_dtype: torch.dtype) -> None:
    # CUDA's autocast runs layer_norm in fp32: the Triton path returns fp32 too, with nn.LayerNorm's values.
    ref = nn.LayerNorm(96).cuda()
    ours = LayerNorm(96, backend="triton").cuda()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 50, 96, device="cuda").to(x_dtype)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, want = ours(x), ref(x)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_vmamba_block_norms_write_the_gemm_dtype_under_autocast() -> None:
    # The two norms of a VSS block feed only a GEMM (the mixer's in_proj, the MLP's fc1): under autocast they write
    # bf16, so those GEMMs cast nothing. (The stream between blocks keeps the dtype the stem's and downsamples' norms
    # give it, as nn.LayerNorm's: fp32 under CUDA's autocast, the input's under the CPU's.)
    model = timm.create_model("test_vmamba", scan_backend="ref").eval()
    blk = model.stages[0].blocks[0]
    seen = {}

    def note(key):
        def hook(module, args):
            seen.setdefault(key, args[0].dtype)

        return hook

    hooks = [blk.mixer.register_forward_pre_hook(note("mixer")), blk.mlp.register_forward_pre_hook(note("mlp"))]
    h, w = model.stages[0].grid
    x = torch.randn(2, h, w, blk.norm.normalized_shape[0])  # an fp32 stream, as CUDA's autocast keeps it
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = blk(x)
    assert (seen["mixer"], seen["mlp"], out.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32), seen
    seen.clear()
    with torch.no_grad():
        blk(x)
    assert set(seen.values()) == {torch.float32}, seen
    for h in hooks:
        h.remove()


def test_gemm_input_dtype_and_a_plain_norm_swapped_in() -> None:
    x = torch.randn(2, 4, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm_input_dtype(x) == torch.bfloat16
        assert gemm_input_dtype(x.double()) is None  # autocast leaves fp64 alone
    model = timm.create_model("test_vmamba", scan_backend="ref").eval()
    blk = model.stages[0].blocks[0]
    h, w = model.stages[0].grid
    x = torch.randn(2, h, w, blk.norm.normalized_shape[0])
    with torch.no_grad():
        want = blk(x)
        for name in ("norm", "norm2"):  # an nn.LayerNorm with the same state: called without the dtype argument
            plain = nn.LayerNorm(x.shape[-1])
            plain.load_state_dict(getattr(blk, name).state_dict())
            setattr(blk, name, plain)
        torch.testing.assert_close(blk(x), want)
