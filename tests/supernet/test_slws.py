"""Stochastic layer-wise shuffle: the schedule, the permutation, and its effect on both families."""

from __future__ import annotations

import pytest
import torch
from supernet_testutils import build

import supernet.vmamba
from supernet import draw_shuffle, shuffle_tokens, slws_probs, unshuffle_tokens


def test_schedule() -> None:
    assert slws_probs(5, 0.5) == [0.0, 0.125, 0.25, 0.375, 0.5]
    assert slws_probs(1, 0.5) == [0.0]
    assert slws_probs(4, 0.0) == [0.0] * 4
    for bad in ((0, 0.5), (3, 1.5), (3, -0.1)):
        with pytest.raises(ValueError):
            slws_probs(*bad)


def test_permutation_round_trips_exactly() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 17, 5)
    perm = draw_shuffle(1.0, 17)
    assert perm is not None and torch.equal(torch.sort(perm).values, torch.arange(17))
    assert torch.equal(unshuffle_tokens(shuffle_tokens(x, perm), perm), x)
    assert torch.equal(shuffle_tokens(x, perm)[:, 0], x[:, perm[0]])  # one permutation for the whole batch


def test_draws_use_the_global_rng_and_nothing_at_p0() -> None:
    state = torch.get_rng_state()
    assert draw_shuffle(0.0, 10) is None
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(1)
    a = [draw_shuffle(0.5, 10) for _ in range(40)]
    torch.manual_seed(1)
    b = [draw_shuffle(0.5, 10) for _ in range(40)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(torch.sort(x).values, torch.arange(10)) for x in a)
    fired = [not torch.equal(x, torch.arange(10)) for x in a]
    assert 8 <= sum(fired) <= 32  # Bernoulli(0.5) over 40 draws (a 1e-4 tail either side); not firing = identity
    assert draw_shuffle(1.0, 10) is not None and not torch.equal(draw_shuffle(1.0, 10), draw_shuffle(1.0, 10))


def test_permutations_are_uniform() -> None:
    """argsort of uniform keys: every token lands on every position equally often (chi-square over 6000 draws)."""
    torch.manual_seed(2)
    counts = torch.zeros(5, 5)
    for _ in range(6000):
        perm = draw_shuffle(1.0, 5)
        counts[torch.arange(5), perm] += 1
    chi2 = ((counts - 1200.0) ** 2 / 1200.0).sum().item()
    assert chi2 < 50.0, counts  # 16 degrees of freedom: P(chi2 > 50) < 1e-4


@pytest.mark.parametrize("name", ["test_vim", "test_local_vmamba"])
def test_p0_is_the_identity(name: str) -> None:
    torch.manual_seed(0)
    model = build(name, img_size=16, shuffle_max=0.0).train()
    x = torch.randn(2, 3, 16, 16)
    state = torch.get_rng_state()
    y_train = model(x)
    assert torch.equal(state, torch.get_rng_state())  # nothing drawn
    torch.testing.assert_close(y_train, model.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["test_vim", "test_local_vmamba"])
def test_shuffle_is_training_only_and_seeded(name: str) -> None:
    torch.manual_seed(0)
    size = 16 if name == "test_vim" else 64  # the hierarchical model's last stage needs more than one token
    model = build(name, img_size=size, shuffle_max=1.0)
    x = torch.randn(2, 3, size, size)
    y_eval = model.eval()(x)
    model.train()
    torch.manual_seed(5)
    y1 = model(x)
    torch.manual_seed(5)
    y2 = model(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert not torch.allclose(y1, y_eval)  # the last layer always shuffles at P_max = 1


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_composed_orders_equal_shuffling_the_hidden_state(pool: str) -> None:
    """Permute hidden state and residual, run the block, argsort back == the block scanning perm[orders]."""
    torch.manual_seed(0)
    model = build("test_local_vim", img_size=16, global_pool=pool)
    block = model.blocks[1]
    n_grid = model.num_grid_tokens
    x, res = torch.randn(2, 2, n_grid + (pool == "token"), model.embed_dim)
    perm = torch.cat([torch.randperm(n_grid), torch.arange(n_grid, x.shape[1])])
    literal = [unshuffle_tokens(t, perm) for t in block(shuffle_tokens(x, perm), shuffle_tokens(res, perm))]
    composed = block(x, res, perm=perm)
    torch.testing.assert_close(composed[0], literal[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(composed[1], literal[1], rtol=0, atol=0)


def test_hierarchical_counts_depth_over_all_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[float, int]] = []

    def record(prob: float, num_tokens: int, device=None):
        seen.append((prob, num_tokens))
        return None

    monkeypatch.setattr(supernet.vmamba, "draw_shuffle", record)
    model = build("test_vmamba", img_size=32, shuffle_max=0.3).train()
    model(torch.randn(1, 3, 32, 32))
    assert [p for p, _ in seen] == pytest.approx(slws_probs(4, 0.3))
    assert [n for _, n in seen] == [64, 16, 4, 1]  # each block shuffles its own stage's tokens


@pytest.mark.parametrize(
    "name, kw", [("test_local_vim_search", {"mix": "hard"}), ("test_local_vmamba_search", {"mix": "gumbel"})]
)
def test_training_draws_stay_on_the_model_device(name: str, kw: dict) -> None:
    """SLWS and the Gumbel noise draw on the model's device: a training step on the meta device makes no tensor
    anywhere else (a host draw, a copy to the device or an ``.item()`` would), so a CUDA graph can capture it."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    off_device: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(isinstance(t, torch.Tensor) and t.device.type != "meta" for t in tree_leaves(out)):
                off_device.append(str(func))
            return out

    model = build(name, img_size=32, shuffle_max=1.0, **kw).train().to("meta")
    with Watch():
        model(torch.randn(2, 3, 32, 32, device="meta")).sum().backward()
    assert not off_device, off_device
