"""Rows of several tensors at the same indices (the sampled orders' parameters): Triton (CPU interpreter) vs the
reference ``index_select``, output and gradient, through the eager direct path and the registered op."""

import pytest
import torch

from kernels import gather_rows, gather_rows_ref
from kernels.testing import poisoned_empty
from kernels.triton_gather import MAX_TENSORS


def _tensors(k: int, shapes, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype in shapes:
        if dtype.is_floating_point:
            out.append(torch.randn(k, *shape, generator=gen, dtype=torch.float64).to(dtype))
        else:
            out.append(torch.randint(-50, 50, (k, *shape), generator=gen, dtype=dtype))
    return out


def _run(fn, idx, tensors, grads):
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]
    outs = fn(idx, leaves)
    used = [(o * g).sum() for o, g in zip(outs, grads) if g is not None]
    if used:
        sum(used).backward()
    return outs, [t.grad for t in leaves]


def _check(fn, idx, tensors, grads, exact_grads: bool):
    with poisoned_empty():
        outs, dts = _run(fn, idx, tensors, grads)
    ref_outs, ref_dts = _run(gather_rows_ref, idx, tensors, grads)
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.dtype == r.dtype and o.shape == r.shape and o.is_contiguous(), i
        assert torch.equal(o, r), f"output {i}"
    for i, (g, r) in enumerate(zip(dts, ref_dts)):
        if r is None:
            assert g is None, f"tensor {i} got a gradient the reference has not"
            continue
        assert g is not None and g.dtype == r.dtype and g.shape == r.shape, i
        if exact_grads:
            assert torch.equal(g, r), f"gradient {i}"
        else:
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6, msg=f"gradient {i}")


# Odd sizes; row lengths up to 2,100 elements (three programs of 1,024 along the first axis at m = 1 already), next to
# tensors whose rows fit in one program; integer tensors (the orders) ride along without a gradient.
SHAPES = [
    ((7, 3), torch.float32),
    ((), torch.float32),
    ((1, 2), torch.float64),
    ((13,), torch.int32),
    ((3, 700), torch.float32),
    ((5,), torch.bfloat16),
]


@pytest.mark.parametrize(
    "k, idx",
    [(5, [3]), (5, [4, 0, 2]), (8, [0, 1, 2, 3, 4, 5, 6, 7]), (3, [2, 1])],
)
def test_gather_rows_matches_index_select(k, idx):
    tensors = _tensors(k, SHAPES, seed=k + len(idx))
    idx = torch.tensor(idx)
    gen = torch.Generator().manual_seed(len(idx))
    grads = [
        torch.randn(len(idx), *t.shape[1:], generator=gen).to(t.dtype) if t.is_floating_point() else None
        for t in tensors
    ]
    _check(lambda i, ts: gather_rows(i, ts, backend="triton"), idx, tensors, grads, exact_grads=True)


def test_repeated_indices_add_up_in_the_backward():
    tensors = _tensors(6, SHAPES[:3] + SHAPES[4:5], seed=1)
    idx = torch.tensor([5, 1, 5, 5], dtype=torch.int32)
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(4, *t.shape[1:], generator=gen, dtype=t.dtype) for t in tensors]
    _check(lambda i, ts: gather_rows(i, ts, backend="triton"), idx, tensors, grads, exact_grads=False)


def test_every_slot_and_unused_outputs():
    """All MAX_TENSORS slots, each of another size; outputs nobody used leave their tensor without a gradient."""
    tensors = _tensors(4, [((j + 1, 3), torch.float32) for j in range(MAX_TENSORS)], seed=3)
    idx = torch.tensor([2, 0])
    gen = torch.Generator().manual_seed(4)
    grads = [None if j in (1, 6) else torch.randn(2, j + 1, 3, generator=gen) for j in range(MAX_TENSORS)]
    _check(lambda i, ts: gather_rows(i, ts, backend="triton"), idx, tensors, grads, exact_grads=True)


@pytest.mark.parametrize("registered", [False, True], ids=["direct", "registered"])
def test_frozen_tensors_get_no_gradient(registered):
    """A float tensor that needs no gradient (a frozen parameter) gives rows that need none, as index_select's."""
    learn, frozen, orders = _tensors(5, [((3, 4), torch.float32), ((6,), torch.float32), ((7,), torch.int32)], seed=9)
    learn.requires_grad_()
    fn = torch.ops.scan_nas.gather_rows if registered else (lambda i, ts: gather_rows(i, ts, backend="triton"))
    idx = torch.tensor([4, 2])
    out = fn(idx, [learn, frozen, orders])
    assert [o.requires_grad for o in out] == [True, False, False]
    out[0].sum().backward()
    assert frozen.grad is None
    torch.testing.assert_close(learn.grad, torch.zeros(5, 3, 4).index_fill_(0, idx, 1.0), rtol=0, atol=0)


def test_registered_op_matches_index_select():
    """The dispatcher path (what torch.compile and FlopCounterMode see) and its backward op."""
    tensors = _tensors(5, SHAPES, seed=5)
    idx = torch.tensor([1, 4])
    gen = torch.Generator().manual_seed(6)
    grads = [
        torch.randn(2, *t.shape[1:], generator=gen).to(t.dtype) if t.is_floating_point() else None for t in tensors
    ]
    _check(torch.ops.scan_nas.gather_rows, idx, tensors, grads, exact_grads=True)
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]
    torch.library.opcheck(torch.ops.scan_nas.gather_rows.default, (idx, leaves))


def test_gather_rows_rejects_bad_input():
    a, b = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="1-D integer"):
        gather_rows(torch.tensor([0.0]), [a], backend="triton")
    with pytest.raises(ValueError, match="1-D integer"):
        gather_rows(torch.tensor([True, False, True, False]), [a], backend="triton")
    with pytest.raises(ValueError, match=r"tensors\[1\]: expected shape \(K=4"):
        gather_rows(torch.tensor([0]), [a, b], backend="triton")
    with pytest.raises(ValueError, match="expected 1 to 8 tensors"):
        gather_rows(torch.tensor([0]), [a] * (MAX_TENSORS + 1), backend="triton")
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        gather_rows(torch.tensor([1, 4]), [a], backend="triton")
