"""Fused Triton scan (CPU interpreter) vs the pure-PyTorch reference: output and every gradient by name."""

import pytest
import torch
import triton
import triton.language as tl

from kernels import selective_scan, selective_scan_ref
from kernels.testing import (
    GRAD_NAMES,
    TOLERANCES,
    compare,
    grad_tolerance,
    make_orders,
    make_scan_inputs,
    poisoned_empty,
    scan_with_grads,
)
from kernels.triton_scan_nd import (
    _add_bf16x2_emulated,
    _lane_rows,
    _lane_sums,
    _lane_sums_fixed,
    _pack_bf16x2_emulated,
    _unpack_bf16x2,
)

# (L, grid or None for identity orders, K, N, Ku, has z / D / delta_bias, order names, channels)
CASES = [
    pytest.param(
        21, (4, 5), 4, 16, 4, (True, True, True), ("h", "v_flip", "w2", "w3_flip"), 4, id="L21-K4-N16-Ku4-cls"
    ),
    pytest.param(63, (7, 9), 2, 1, 1, (False, False, False), ("w3_flip", "v"), 4, id="L63-K2-N1-Ku1-bare"),
    pytest.param(63, (9, 7), 1, 16, 1, (True, True, False), ("w2",), 4, id="L63-K1-N16-zD"),
    pytest.param(37, (4, 9), 2, 1, 2, (False, True, True), ("v_flip", "zh"), 4, id="L37-K2-N1-Ku2-Dbias"),
    pytest.param(37, None, 2, 16, 1, (True, False, True), None, 4, id="L37-K2-N16-identity-zbias"),
    pytest.param(21, (3, 7), 4, 16, 1, (True, True, True), ("h", "v_flip", "w2", "w3_flip"), 12, id="L21-K4-Ku1-D12"),
]


def _check(y, grads, y_ref, grads_ref, dtype):
    rtol, atol = TOLERANCES[dtype]
    recs = [compare("y", y, y_ref, rtol, atol)]
    recs += [compare(n, grads[n], grads_ref[n], *grad_tolerance(n, dtype)) for n in GRAD_NAMES if n in grads]
    bad = [r for r in recs if not r["ok"]]
    assert not bad, bad
    assert set(grads) == set(grads_ref)


@pytest.mark.parametrize("seqlen, hw, k, n, ku, extras, names, dim", CASES)
def test_triton_matches_ref(seqlen, hw, k, n, ku, extras, names, dim):
    """Channels 12 > BLOCK_D 8 also checks the partial channel block and the cross-block dB/dC reduction."""
    has_z, has_D, has_bias = extras
    gen = torch.Generator().manual_seed(seqlen + 7 * k + n)
    inputs = make_scan_inputs(1, seqlen, k, dim, n, ku=ku, has_D=has_D, has_z=has_z, has_bias=has_bias, generator=gen)
    orders = make_orders(seqlen, hw, k, names) if hw is not None else None
    with poisoned_empty():  # every buffer the Triton path allocates starts as NaN
        y, grads, dy = scan_with_grads(selective_scan, inputs, orders=orders, backend="triton")
    y_ref, grads_ref, _ = scan_with_grads(selective_scan_ref, inputs, dy=dy, orders=orders)
    _check(y, grads, y_ref, grads_ref, torch.float32)


def test_shared_z_no_softplus_fp32_out():
    """Kz = 1 (gate shared by every order), no softplus, fp32 output from fp32 inputs, non-contiguous u."""
    seqlen, k = 35, 2
    gen = torch.Generator().manual_seed(3)
    inputs = make_scan_inputs(1, seqlen, k, 4, 4, ku=1, kz=1, generator=gen)
    inputs["u"] = torch.randn(1, seqlen, 1, 8, generator=gen)[..., ::2]  # last-dim stride 2
    orders = make_orders(seqlen, (5, 7), k, ("wv3", "h_flip"))
    kw = dict(orders=orders, delta_softplus=False, out_dtype=torch.float32)
    with poisoned_empty():
        y, grads, dy = scan_with_grads(selective_scan, inputs, backend="triton", **kw)
    y_ref, grads_ref, _ = scan_with_grads(selective_scan_ref, inputs, dy=dy, **kw)
    _check(y, grads, y_ref, grads_ref, torch.float32)


def test_forward_without_grad_and_nan_fails():
    inputs = make_scan_inputs(1, 21, 2, 4, 2, generator=torch.Generator().manual_seed(0))
    orders = make_orders(21, (3, 7), 2, ("v", "w2_flip"))
    with torch.no_grad(), poisoned_empty():
        y = selective_scan(**inputs, orders=orders, backend="triton")
    y_ref = selective_scan_ref(**inputs, orders=orders)
    assert compare("y", y, y_ref, *TOLERANCES[torch.float32])["ok"]
    y_bad = y.clone()
    y_bad[0, 3, 1, 2] = float("nan")
    assert not compare("y", y_bad, y_ref, *TOLERANCES[torch.float32])["ok"]


def test_auto_backend_on_cpu_is_ref():
    inputs = make_scan_inputs(1, 9, 1, 3, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(selective_scan(**inputs), selective_scan_ref(**inputs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_ref_cuda(dtype):
    seqlen, k = 197, 4
    inputs = make_scan_inputs(2, seqlen, k, 40, 16, ku=1, dtype=dtype, device="cuda")
    orders = make_orders(seqlen, (14, 14), k).cuda()
    with poisoned_empty():
        y, grads, dy = scan_with_grads(selective_scan, inputs, orders=orders, backend="triton")
    y_ref, grads_ref, _ = scan_with_grads(selective_scan, inputs, dy=dy, orders=orders, backend="ref")
    _check(y, grads, y_ref, grads_ref, dtype)


@pytest.mark.parametrize(
    "seqlen, hw, k, n, ku, extras, config",
    [
        pytest.param(21, (4, 5), 4, 16, 1, True, (8, 8, 1, 4, 8, 1, 4), id="nd-L21-K4-N16-Ku1"),
        pytest.param(35, (5, 7), 2, 1, 2, False, (16, 8, 1, 8, 8, 1, 1), id="nd-L35-K2-N1-Ku2"),
        pytest.param(21, (4, 5), 2, 16, 2, True, (8, 8, 1, 4, 8, 1, 2, 1), id="nd-prefetch-L21-K2-N16-Ku2"),
        pytest.param(35, (5, 7), 4, 1, 1, True, (8, 8, 1, 8, 8, 1, 1, 1), id="nd-prefetch-L35-K4-N1-Ku1"),
        pytest.param(35, (5, 7), 2, 1, 1, True, (4, 8, 1, 16, 8, 1, 1, 1), id="nd-longfwd-L35-K2-N1-Ku1"),
        pytest.param(21, (4, 5), 2, 16, 2, False, (2, 8, 1, 8, 8, 1, 4, 0), id="nd-longfwd-L21-K2-N16-Ku2"),
        pytest.param(21, (4, 5), 2, 16, 1, True, (8, 8, 1, 4, 8, 1, 4, 0, 1), id="nd-onedecay-L21-K2-N16-Ku1"),
        pytest.param(35, (5, 7), 2, 1, 2, True, (4, 8, 1, 16, 8, 1, 1, 1, 1), id="nd-onedecay-prefetch-L35-K2-N1"),
        pytest.param(21, (4, 5), 2, 16, 2, True, (4, 16, 1, 8, 8, 1, 2, 0, 1), id="nd-onedecay-wide-bwd-L21-K2-N16"),
        pytest.param(21, (4, 5), 2, 16, 1, True, (2, 8, 1, 4, 8, 1, 16, 0, 1), id="nd-onegroup-L21-K2-N16-Ku1"),
        pytest.param(21, (4, 5), 2, 16, 2, True, (2, 8, 1, 4, 8, 1, 16, 1, 1), id="nd-onegroup-prefetch-L21-K2-N16"),
        pytest.param(21, (4, 5), 2, 5, 1, True, (2, 8, 1, 4, 8, 1, 8, 0, 1), id="nd-onegroup-L21-K2-N5-padded"),
        # split along L: the 10th number is the backward's segment count
        # (chunks 3+3+1 in groups of 4 states; 2 each with prefetch; 1 each; none on the two-decay path)
        pytest.param(25, (4, 6), 2, 8, 1, True, (4, 8, 1, 8, 8, 1, 4, 0, 1, 3), id="nd-split3-L25-K2-N8-groups"),
        pytest.param(37, (4, 9), 2, 1, 1, True, (4, 8, 1, 16, 8, 1, 1, 1, 1, 5), id="nd-split5-prefetch-L37-K2-N1"),
        pytest.param(21, (4, 5), 2, 5, 1, False, (8, 8, 1, 8, 8, 1, 8, 0, 1, 99), id="nd-split-every-chunk-N5"),
        pytest.param(21, (4, 5), 2, 4, 2, True, (8, 8, 1, 4, 8, 1, 2, 0, 0, 3), id="nd-twodecay-no-split"),
        pytest.param(21, (4, 5), 2, 8, 2, True, (8, 8, 1, 4, 8, 1, 4, 0, 1, 0, 64), id="nd-maxnreg-N8"),
        # the forward split along L (12th number): 4-step forward chunks in segments of 3+3+1 (the second starts in
        # the middle of a saved-state interval); 2-step ones in 4+4+4+1, with the backward split too; 8-step ones
        # (longer than the interval: in-chunk saves) in 2+2; one segment per chunk
        pytest.param(25, (4, 6), 2, 8, 1, True, (8, 8, 1, 4, 8, 1, 4, 0, 1, 0, 0, 3), id="nd-fwdsplit3-L25-N8"),
        pytest.param(25, (4, 6), 2, 4, 2, True, (4, 8, 1, 2, 8, 1, 4, 0, 1, 2, 0, 4), id="nd-fwdsplit4-bwdsplit2-N4"),
        pytest.param(25, (4, 6), 2, 16, 1, True, (2, 8, 1, 8, 8, 1, 8, 0, 1, 0, 0, 3), id="nd-fwdsplit2-longfwd-N16"),
        pytest.param(21, (4, 5), 2, 1, 1, False, (4, 8, 1, 4, 8, 1, 1, 1, 1, 0, 0, 99), id="nd-fwdsplit-each-chunk-N1"),
    ],
)
def test_nd_layout_kernels_match_ref(monkeypatch, seqlen, hw, k, n, ku, extras, config):
    """The (T, N, D)-tile kernels (7 to 12 numbers: the 8th turns on the backward's prefetch, the 9th its one-decay
    adjoint, the 10th splits that backward along L, the 11th caps its registers, the 12th splits the forward along
    L), with a forward chunk shorter, and longer, than the saved-state interval."""
    import kernels.triton_scan as ts

    monkeypatch.setattr(ts, "scan_config", lambda *args: config)
    gen = torch.Generator().manual_seed(seqlen * k)
    inputs = make_scan_inputs(1, seqlen, k, 12, n, ku=ku, has_D=extras, has_z=extras, has_bias=extras, generator=gen)
    orders = make_orders(seqlen, hw, k, ("zh", "w2_flip", "v", "h"))
    with poisoned_empty():
        y, grads, dy = scan_with_grads(ts.selective_scan_triton, inputs, orders=orders)
    y_ref, grads_ref, _ = scan_with_grads(selective_scan_ref, inputs, dy=dy, orders=orders)
    _check(y, grads, y_ref, grads_ref, torch.float32)


def test_forward_split_at_batch_3_folds_each_images_own_segments(monkeypatch):
    """The forward split at batch 3 with 4 segments (2+2+2+1 chunks): each program folds the carries of its own
    image's and order's earlier segments (slot = segment·B·K + image·K + order). Outputs and gradients against the
    reference; the saved chunk states, also those of the backward's recompute pass (no y), against the unsplit run."""
    import kernels.triton_scan as ts

    config = (8, 8, 1, 2, 8, 1, 4, 0, 1, 0, 0, 4)  # 2-step forward chunks: 7 of them for 13 steps
    monkeypatch.setattr(ts, "scan_config", lambda *args: config)
    gen = torch.Generator().manual_seed(25)
    inputs = make_scan_inputs(3, 13, 2, 10, 4, ku=1, generator=gen)
    orders = make_orders(13, (3, 4), 2, ("w2_flip", "v"))
    with poisoned_empty():
        y, grads, dy = scan_with_grads(ts.selective_scan_triton, inputs, orders=orders)
    y_ref, grads_ref, _ = scan_with_grads(selective_scan_ref, inputs, dy=dy, orders=orders)
    _check(y, grads, y_ref, grads_ref, torch.float32)
    args = [inputs[name] for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    unsplit = ts.scan_fwd(*args, True, orders, None, True, config=config[:11] + (1,))[1]
    for store_y in (True, False):
        states = ts.scan_fwd(*args, True, orders, None, True, config=config, store_y=store_y)[1]
        torch.testing.assert_close(states, unsplit, rtol=1e-5, atol=1e-6)


def test_split_backward_with_int64_offsets_batch_and_shared_gate(monkeypatch):
    """The split backward and forward at batch 2 with a gate shared by the orders (Kz = 1), on the int64 row-offset
    path the launcher takes for huge slices (forced here), against the reference."""
    import kernels.triton_scan as ts

    monkeypatch.setattr(ts, "scan_config", lambda *args: (4, 8, 1, 4, 8, 1, 2, 1, 1, 3, 0, 2))
    monkeypatch.setattr(ts, "_needs_int64", lambda *args: True)
    gen = torch.Generator().manual_seed(11)
    inputs = make_scan_inputs(2, 17, 2, 10, 4, ku=1, kz=1, generator=gen)
    orders = make_orders(17, (4, 4), 2, ("v_flip", "w2"))  # 4x4 grid + an extra token: chunks 4+4+4+4+1, segments 2+2+1
    # (forward: the same chunks, in segments of 3 + 2)
    with poisoned_empty():
        y, grads, dy = scan_with_grads(ts.selective_scan_triton, inputs, orders=orders)
    y_ref, grads_ref, _ = scan_with_grads(selective_scan_ref, inputs, dy=dy, orders=orders)
    _check(y, grads, y_ref, grads_ref, torch.float32)


def test_int64_offsets_chosen_only_when_a_slice_overflows_int32():
    from kernels.triton_scan import _needs_int64

    def meta(size, stride):
        return torch.empty_strided(size, stride, device="meta")

    small = meta((2, 197, 8, 384), (197 * 8 * 384, 8 * 384, 384, 1))
    assert not _needs_int64(197, 8, 384, 16, small, None)
    long_rows = meta((1, 4096, 1, 600_000), (4096 * 600_000, 600_000, 0, 1))  # L × token stride ≥ 2^31
    assert _needs_int64(4096, 1, 8, 16, long_rows)
    n_outer = meta((1, 64, 1, 16), (64 * 2**27, 1, 0, 2**27))  # B/C with the state axis outermost
    assert _needs_int64(64, 1, 8, 16, n_outer)
    assert _needs_int64(2**20, 8, 384, 16)  # the (B, L, K, D) outputs alone: L·K·D ≥ 2^31
    # An order-major delta (what the mixer's per-order projections give): order stride B·L·D. VMamba-T stage 1 at
    # K 8 and batch 128 stays in int32; at batch 512, (K - 1)·B·L·D ≥ 2^31 while every row offset is small.
    for bsz, wide in ((128, False), (512, True)):
        seqlen, dim = 3136, 192
        order_major = meta((bsz, seqlen, 8, dim), (seqlen * dim, dim, bsz * seqlen * dim, 1))
        assert _needs_int64(seqlen, 8, dim, 1, order_major) is wide


def test_split_segments_cover_every_chunk_once():
    from kernels.triton_scan import _fwd_segments, _segments

    cpu = torch.device("cpu")
    for n_chunks in (1, 5, 16, 97, 784):
        for want in (1, 2, 3, 7, 16, 1000):
            for n_seg, per in (
                _segments((4, 32, 1, 32, 32, 1, 1, 1, 1, want), n_chunks, 1536, cpu),
                _fwd_segments((4, 32, 1, 32, 32, 1, 1, 1, 1, 0, 0, want), n_chunks, 1536, cpu),
            ):
                assert 1 <= n_seg <= min(want, n_chunks) and (n_seg - 1) * per < n_chunks <= n_seg * per
    # automatic: no split on the CPU
    assert _segments((4, 32, 1, 32, 32, 1, 1, 1, 1), 784, 1536, cpu) == (1, 784)
    assert _fwd_segments((4, 32, 1, 32, 32, 1, 1, 1, 1), 98, 1536, cpu) == (1, 98)


@pytest.mark.parametrize("shape, dtype", [((2, 37, 4, 12), torch.bfloat16), ((1, 63, 3, 5), torch.float32),
                                          ((3, 5, 8, 130), torch.float16)])  # fmt: skip
def test_sum_over_orders_matches_torch(shape, dtype):
    """The K-sum of a shared input's per-order gradients: fp32 accumulation, one rounding (the interpreter rounds
    toward zero, so within one unit in the last place)."""
    from kernels.triton_scan import _sum_orders

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])).to(dtype)
    got, want = _sum_orders(x), x.float().sum(2, keepdim=True)
    assert got.shape == want.shape and got.dtype == dtype
    ulp = want.abs() * torch.finfo(dtype).eps
    assert bool(((got.float() - want).abs() <= ulp + 1e-30).all())


def test_ref_in_float64_agrees_with_float32():
    """fp64 inputs run the reference in fp64 (the GPU grid's truth for fp32 cases); it agrees with the fp32 run."""
    gen = torch.Generator().manual_seed(5)
    x = make_scan_inputs(2, 37, 2, 6, 4, ku=1, generator=gen)
    orders = make_orders(37, (4, 9), 2, ("w2", "v_flip"))
    y32 = selective_scan_ref(**x, orders=orders)
    y64 = selective_scan_ref(**{k: (v.double() if v is not None else None) for k, v in x.items()}, orders=orders)
    assert y64.dtype == torch.float64 and y32.dtype == torch.float32
    torch.testing.assert_close(y64.float(), y32, rtol=1e-5, atol=1e-5)
    assert not torch.equal(y64, y32.double())  # it really ran in fp64


def test_tuning_candidates_and_gpu_defaults_are_well_formed():
    """Every block-size tuple the GPU tuner or the CUDA defaults can pick has 3, 7 to 9, 11 or 12 numbers, power-of-two
    tiles, a forward chunk that divides the saved-state interval or is divided by it, on/off switches, an automatic
    segment count and a register cap ptxas can meet."""
    from kernels.bench import CANDIDATES
    from kernels.triton_scan import scan_config

    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    defaults = [scan_config(dim, n, seqlen, cuda) for dim in (96, 384) for n in (1, 4, 16) for seqlen in (197, 3136)]
    for cfg in [c for cands in CANDIDATES.values() for c in cands] + defaults:
        assert len(cfg) in (3, 7, 8, 9, 11, 12), cfg
        tiles = cfg[:2] if len(cfg) == 3 else (*cfg[:2], *cfg[3:5], cfg[6])
        assert all(v > 0 and v & (v - 1) == 0 for v in tiles), cfg
        if len(cfg) > 3:
            assert cfg[0] % cfg[3] == 0 or cfg[3] % cfg[0] == 0, cfg
            assert all(v in (0, 1) for v in cfg[7:9]), cfg
            assert len(cfg) < 10 or (cfg[9] == 0 and (cfg[10] == 0 or 64 <= cfg[10] <= 255)), cfg
            assert len(cfg) < 12 or cfg[11] == 0, cfg


@triton.jit
def _lane_sums_kernel(x_ptr, out_ptr, hits_ptr, V: tl.constexpr, W: tl.constexpr):
    lane = tl.arange(0, W)
    x = tl.load(x_ptr + tl.arange(0, V)[:, None] * W + lane[None, :])
    at, owner = _lane_rows(lane, V, W)
    tl.store(out_ptr + at, _lane_sums(x, lane), mask=owner)
    tl.atomic_add(hits_ptr + at, tl.where(owner, 1, 0))


@pytest.mark.parametrize("rows, width", [(1, 8), (4, 8), (8, 8), (32, 8), (4, 32), (64, 32), (16, 2), (2, 64)])
def test_lane_sums_reduce_scatter_every_row(rows, width):
    """The backward's reduce-scattered channel sum: every row's sum lands at the (entry, channel) the row map names,
    stored once (with fewer rows than channels, only one of the channels holding a sum stores it)."""
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows * width))
    out = torch.full((rows,), float("nan"))
    hits = torch.zeros(rows, dtype=torch.int32)
    _lane_sums_kernel[(1,)](x, out, hits, rows, width)
    torch.testing.assert_close(out, x.sum(1), rtol=1e-6, atol=1e-6)
    assert hits.tolist() == [1] * rows


@triton.jit
def _lane_sums_fixed_kernel(x_ptr, out_ptr):
    lane = tl.arange(0, 32)
    x = tl.load(x_ptr + tl.arange(0, 32)[:, None] * 32 + lane[None, :])
    tl.store(out_ptr + lane[None, :], _lane_sums_fixed(x, lane))


def _fixed_sums_expected(x: torch.Tensor) -> torch.Tensor:
    """What the fixed-point sums promise, in float64: one power-of-two scale per tile putting its largest |value| in
    [2^21, 2^22), each term rounded to an integer (ties to even), exact sums, scaled back."""
    e = max(int(torch.frexp(x.abs().max().double())[1]) - 1, -105)  # 2^e <= max |x| < 2^(e+1), capped below
    scale = 2.0 ** (21 - e)
    return torch.round(x.double() * scale).sum(1) / scale


def test_lane_sums_fixed_exact():
    """The backward's fixed-point channel sums (here the interpreter's stand-in for redux.sync): row j's sum in lane j,
    equal to the promised rounding of every term to 2^-21 of the tile's largest and an exact sum; within 2^-16 of the
    tile's largest of the true sums, rows whose terms are 2^-30 of the largest included; inf or NaN gives NaN."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(32, 32, generator=gen) * 10.0 ** torch.randint(-4, 4, (32, 1), generator=gen).float()
    x[3] *= 2.0**-30
    x[7] = 0.0
    # scales: ordinary, tiny, huge, the largest below 2^-104 (the scale capped at 2^126: terms rounded to 2^-126), zero
    for tile in (x, x * 1e-30, x * 1e30, x / x.abs().max() * 2.0**-110, torch.zeros(32, 32)):
        out = torch.full((32,), float("nan"))
        _lane_sums_fixed_kernel[(1,)](tile, out)
        assert torch.equal(out.double(), _fixed_sums_expected(tile).float().double()), (out, tile.abs().max())
        bound = max(2.0**-16 * float(tile.abs().max()), 16 * 2.0**-126)
        assert (out.double() - tile.double().sum(1)).abs().max() <= bound
    # the largest term within a unit of FLT_MAX rounds up to 2^22 units: inf (documented), the other rows unharmed
    y = x.clone()
    y[2, 5] = torch.finfo(torch.float32).max
    out = torch.zeros(32)
    _lane_sums_fixed_kernel[(1,)](y, out)
    assert out[2] == float("inf") and (out[:2] == 0).all() and (out[3:] == 0).all()
    for bad in (float("inf"), float("nan")):
        y = x.clone()
        y[9, 30] = bad
        out = torch.zeros(32)
        _lane_sums_fixed_kernel[(1,)](y, out)
        assert out.isnan().all()


def _check_channel_sums(monkeypatch, inputs, orders, switch, rel_max):
    """A backward whose dB/dC channel sums are switched on by the module flag ``switch``: against the reference with
    the inputs' tolerances, and against the fp32 butterfly sums (the flag off) only dB and dC differ, by < rel_max."""
    import kernels.triton_scan as ts

    with poisoned_empty():
        y, grads, dy = scan_with_grads(ts.selective_scan_triton, inputs, orders=orders)
    y_ref, grads_ref, _ = scan_with_grads(selective_scan_ref, inputs, dy=dy, orders=orders)
    _check(y, grads, y_ref, grads_ref, inputs["u"].dtype)
    monkeypatch.setattr(ts, switch, False)
    monkeypatch.setattr(ts, "_FIXED_SUMS", False)
    _, grads32, _ = scan_with_grads(ts.selective_scan_triton, inputs, dy=dy, orders=orders)
    for name, g in grads.items():
        if name in ("B", "C"):
            rel = float((g.float() - grads32[name].float()).norm() / grads32[name].float().norm())
            assert 0 < rel < rel_max, (name, rel)
        else:
            assert torch.equal(g, grads32[name]), name


def test_fixed_channel_sums_match_ref(monkeypatch):
    """The fixed-point channel sums of dB and dC in the backward (32 (step, state) rows per group on one warp of 32
    channels: here 8 steps x 4 states, 37 channels over blocks of 32, a partial chunk), taken here with fp32 B and C
    (by default only half-precision ones take them) to see their own error: against the reference with fp32
    tolerances; against the fp32 shuffle sums only dB and dC differ, by < 1e-5 in norm. Each term is rounded to
    2^-21 of its tile's largest, so the error is relative to the tile's largest term, not to the sum: over seeds 40-51
    it read 0.7-2.0e-6, and 2.4e-6 for this seed on another CPU (the interpreter's float ops differ in the last bits
    between CPUs); the bf16 packed sums read about 5e-3."""
    import kernels.triton_scan as ts

    config = (8, 32, 1, 4, 32, 1, 4, 0, 1)
    monkeypatch.setattr(ts, "scan_config", lambda *args: config)
    monkeypatch.setattr(ts, "_HALF", (torch.float32,))
    gen = torch.Generator().manual_seed(43)
    inputs = make_scan_inputs(1, 11, 2, 37, 8, ku=1, generator=gen)
    orders = make_orders(11, (1, 11), 2, ("h", "h_flip"))
    _check_channel_sums(monkeypatch, inputs, orders, "_FIXED_SUMS", 1e-5)


class _LaunchSpy:
    """Stands in for a Triton kernel: records each launch's keyword arguments, then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_fixed_channel_sums_switch(monkeypatch):
    """On by default for bf16/fp16 B and C on eligible tiles (the launch gets FIXED_SUM), not for fp32 B or C, other
    tiles, the opt-in packed sums, or once switched off; a bf16 scan through them matches the reference."""
    import kernels.triton_scan as ts
    import kernels.triton_scan_nd as nd

    bf, f32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    assert ts.fixed_channel_sums(8, 32, 1, 4, bf, bf) and ts.fixed_channel_sums(4, 32, 1, 8, bf, bf.half())
    assert not ts.fixed_channel_sums(8, 32, 1, 4, f32, f32) and not ts.fixed_channel_sums(8, 32, 1, 4, bf, f32)
    assert not ts.fixed_channel_sums(4, 32, 1, 1, bf, bf)  # N = 1: the reduce-scatter
    assert not ts.fixed_channel_sums(8, 64, 2, 4, bf, bf) and not ts.fixed_channel_sums(8, 16, 1, 4, bf, bf)
    assert not ts.fixed_channel_sums(8, 32, 1, 4, bf, bf, packed=True)
    spy = _LaunchSpy(nd._scan_bwd_nd_kernel)
    monkeypatch.setattr(nd, "_scan_bwd_nd_kernel", spy)
    monkeypatch.setattr(ts, "scan_config", lambda *args: (8, 32, 1, 4, 32, 1, 4, 0, 1))
    inputs = make_scan_inputs(1, 9, 1, 32, 16, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(47))
    y, grads, dy = scan_with_grads(ts.selective_scan_triton, inputs)
    y_ref, grads_ref, _ = scan_with_grads(selective_scan_ref, inputs, dy=dy)
    _check(y, grads, y_ref, grads_ref, torch.bfloat16)
    try:
        ts.set_fixed_channel_sums(False)
        assert not ts.fixed_channel_sums(8, 32, 1, 4, bf, bf)
        scan_with_grads(ts.selective_scan_triton, inputs, dy=dy)
    finally:
        ts.set_fixed_channel_sums(True)
    scan_with_grads(ts.selective_scan_triton, {n: t.float() if t is not None else t for n, t in inputs.items()}, dy=dy)
    assert [c["FIXED_SUM"] for c in spy.calls] == [True, False, False]
    with pytest.raises(TypeError, match="True or False"):
        ts.set_fixed_channel_sums(0)


def test_channel_sums_one_switch(monkeypatch):
    """kernels.set_channel_sums sets both switches from one name and channel_sums() reads it back; an unknown name is
    refused with the valid ones."""
    import kernels
    import kernels.triton_scan as ts

    monkeypatch.setattr(ts, "_FIXED_SUMS", True)
    monkeypatch.setattr(ts, "_PACKED_SUMS", False)
    assert kernels.channel_sums() == "fixed"  # the default
    for mode, flags in (("packed", (False, True)), ("butterfly", (False, False)), ("fixed", (True, False))):
        kernels.set_channel_sums(mode)
        assert (ts._FIXED_SUMS, ts._PACKED_SUMS) == flags and kernels.channel_sums() == mode
    with pytest.raises(ValueError, match="'exact' are not known; use one of fixed, butterfly, packed"):
        kernels.set_channel_sums("exact")


def test_sm80_sums_only_on_nvidia_sm80_gpus(monkeypatch):
    """The fixed-point and packed channel sums compile to sm_80+ PTX (redux.sync, bf16x2): on a GPU they are taken
    only on NVIDIA devices of compute capability 8.0 or newer, not on older ones or ROCm (whose devices torch also
    calls cuda). Off the GPU the interpreter runs their emulations."""
    import types

    import kernels.triton_scan as ts

    bf = types.SimpleNamespace(dtype=torch.bfloat16, device=torch.device("cuda", 0))  # no GPU needed to ask
    monkeypatch.setattr(ts, "_PACKED_SUMS", True)
    seen = []
    for hip, cc in ((None, (9, 0)), (None, (8, 0)), (None, (7, 5)), ("6.2", (9, 4))):
        monkeypatch.setattr(torch.version, "hip", hip)
        monkeypatch.setattr(ts, "_capability_of", lambda index, cc=cc: cc)
        seen.append((ts.fixed_channel_sums(8, 32, 1, 4, bf, bf), ts.packed_channel_sums(bf, bf, False)))
    assert seen == [(True, True), (True, True), (False, False), (False, False)]


@triton.jit
def _bf16x2_kernel(a_ptr, b_ptr, c_ptr, d_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    p = _pack_bf16x2_emulated(tl.load(a_ptr + offs), tl.load(b_ptr + offs))
    q = _pack_bf16x2_emulated(tl.load(c_ptr + offs), tl.load(d_ptr + offs))
    p_hi, p_lo = _unpack_bf16x2(p)
    s_hi, s_lo = _unpack_bf16x2(_add_bf16x2_emulated(p, q))
    for i, v in enumerate((p_hi, p_lo, s_hi, s_lo)):
        tl.store(out_ptr + i * BLOCK + offs, v)


def test_bf16x2_emulation_rounds_to_nearest_even():
    """The interpreter's stand-in for cvt.rn.bf16x2.f32 and add.rn.bf16x2: each half rounds to bf16 as torch does
    (nearest, ties to even), and a packed add is the fp32 sum of the halves rounded to bf16."""
    gen = torch.Generator().manual_seed(7)
    n = 64
    a, b, c, d = (torch.randn(n, generator=gen) * 10.0 ** torch.randint(-30, 30, (n,), generator=gen) for _ in range(4))
    # halfway cases: 1 + 2^-8 rounds down to 1, 1 + 3·2^-8 up to 1 + 2^-6, -(1 + 2^-8) to -1, and a subnormal
    bits = [0x3F808000, 0x3F818000, 0xBF808000 - (1 << 32), 0x00018000]
    a[:4] = torch.tensor(bits, dtype=torch.int32).view(torch.float32)
    out = torch.empty(4, n)
    _bf16x2_kernel[(1,)](a, b, c, d, out, n)
    bf = [t.to(torch.bfloat16).float() for t in (a, b, c, d)]
    torch.testing.assert_close(out[0], bf[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], bf[1], rtol=0, atol=0)
    torch.testing.assert_close(out[2], (bf[0] + bf[2]).to(torch.bfloat16).float(), rtol=0, atol=0)
    torch.testing.assert_close(out[3], (bf[1] + bf[3]).to(torch.bfloat16).float(), rtol=0, atol=0)
    assert out[0, :3].tolist() == [1.0, 1.015625, -1.0]


def test_packed_bf16_channel_sums_match_ref(monkeypatch):
    """Opted in with bf16 B and C, the backward sums dB and dC over the channels as packed bf16 pairs (here the
    interpreter's integer emulation), with groups of 4 states and 12 channels over blocks of 8.
    Against the reference with bf16 tolerances (at this size: 12 channels per sum); against the default fp32 channel
    sums only dB and dC differ, by bf16 rounding."""
    import kernels.triton_scan as ts

    config = (4, 8, 1, 4, 8, 1, 4, 0, 1)
    monkeypatch.setattr(ts, "scan_config", lambda *args: config)
    monkeypatch.setattr(ts, "_PACKED_SUMS", True)
    gen = torch.Generator().manual_seed(41)
    inputs = make_scan_inputs(1, 9, 1, 12, 8, dtype=torch.bfloat16, generator=gen)
    orders = make_orders(9, (2, 4), 1, ("w2_flip",))
    _check_channel_sums(monkeypatch, inputs, orders, "_PACKED_SUMS", 2e-2)


def test_packed_channel_sums_switch():
    import kernels.triton_scan as ts

    bf, f32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    assert not ts.packed_channel_sums(bf, bf, False)  # off by default
    try:
        ts.set_packed_channel_sums(True)
        assert ts.packed_channel_sums(bf, bf, False) and not ts.packed_channel_sums(bf, bf, True)
        assert not ts.packed_channel_sums(f32, f32, False) and not ts.packed_channel_sums(bf, f32, False)
    finally:
        ts.set_packed_channel_sums(False)
    with pytest.raises(TypeError, match="True or False"):
        ts.set_packed_channel_sums(1)
