"""Stochastic layer-wise shuffle (SLWS), the regularizer of ShuffleMamba (arXiv 2408.17081).

In training, layer ``l`` of ``depth`` shuffles its tokens with probability ``p_l = P_max · l / (depth − 1)`` (layer 0
never): one Bernoulli draw per layer per step for the whole batch and, when it fires, one uniformly random
permutation of the tokens shared by the batch, applied to the hidden state and the residual before the layer and
undone (``argsort``) after it. Draws come from the default generator of the device the model runs on (torch CPU or
CUDA, both seeded by ``torch.manual_seed`` and saved with a run's checkpoints), and never reach the host: no
synchronisation, nothing data-dependent in Python, so a training step with SLWS can be captured as a CUDA graph or
compiled whole.

In the plain family a block's only token-order-dependent computations are its scans along orders (the per-order
causal conv1d included); everything else acts on each token alone. Shuffling the tokens, scanning order ``o`` and
unshuffling is therefore exactly the same as scanning the composed order ``perm[o]`` on the unshuffled tokens, which
is how the models apply it (:meth:`supernet.mixer.MultiOrderMixer.forward`, ``perm=``): no activation is copied
(tested against the literal form). The hierarchical family applies the same composed orders, but its 3×3 depthwise
conv before the scan keeps seeing the true image grid, so there SLWS shuffles what the scans see and is NOT the
literal "shuffle the whole block's tokens" of ShuffleMamba (which would feed the conv a scrambled image): a
deliberate variant. :func:`shuffle_tokens` / :func:`unshuffle_tokens` are the literal form, kept for tests and for
readers.
"""

from __future__ import annotations

from numbers import Integral

import torch

__all__ = ["draw_shuffle", "shuffle_tokens", "slws_probs", "unshuffle_tokens"]


def slws_probs(depth: int, p_max: float) -> list[float]:
    """Per-layer shuffle probabilities ``p_l = p_max · l / (depth − 1)``; layer 0 (and a depth-1 model) never shuffles.

    Args:
        depth: number of layers (all blocks of all stages in the hierarchical family).
        p_max: probability of the last layer, in [0, 1].
    """
    if not isinstance(depth, Integral) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"slws_probs: depth must be an integer >= 1, got {depth!r}")
    if not 0.0 <= p_max <= 1.0:
        raise ValueError(f"slws_probs: p_max (shuffle_max) must be in [0, 1], got {p_max!r}")
    if depth == 1:
        return [0.0]
    return [p_max * layer / (depth - 1) for layer in range(depth)]


def draw_shuffle(prob: float, num_tokens: int, device: torch.device | str | None = None) -> torch.Tensor | None:
    """One step's draw for one layer: a (num_tokens,) permutation on ``device``, random with probability ``prob`` and
    the identity otherwise; None when ``prob`` is 0.

    The permutation is the argsort of ``num_tokens`` uniform float64 draws (uniformly random up to ties, ~1e-9 likely
    at 3,136 tokens) and the Bernoulli decision is a ``torch.where`` on the device, so the host never waits for it.
    A layer with ``prob`` > 0 therefore composes its orders with a permutation every step, the identity when the draw
    does not fire. Nothing is drawn when ``prob`` is 0, so ``shuffle_max=0`` leaves the RNG stream untouched.
    """
    if prob <= 0.0:
        return None
    # float64 keys: with float32's 24 bits, ties (kept in index order by the sort) occur in ~1 draw in 6 at 3,136
    # tokens; with 53 bits a tie is ~1e-9 likely there.
    draws = torch.rand(num_tokens + 1, device=device, dtype=torch.float64)
    perm = torch.argsort(draws[1:])
    return torch.where(draws[0] < prob, perm, torch.arange(num_tokens, device=device))


def shuffle_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """(B, L, ...) → (B, L, ...) with ``out[:, i] = x[:, perm[i]]`` (the batch shares ``perm``)."""
    return x.index_select(1, perm.to(x.device))


def unshuffle_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Undo :func:`shuffle_tokens` with ``argsort(perm)``."""
    return x.index_select(1, torch.argsort(perm).to(x.device))
