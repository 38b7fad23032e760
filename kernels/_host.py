"""Host-side integer helpers for the launchers.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions since Triton 3.8: about 5 µs per call from
host code, and a launcher makes a dozen such calls. These are the same arithmetic in plain Python (they also take
the symbolic sizes of a fake implementation).
"""

__all__ = ["cdiv", "next_pow2"]


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for a ≥ 0, b > 0."""
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()
