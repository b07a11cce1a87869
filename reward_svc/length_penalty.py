"""The k1.5 length reward, which pushes the policy away from overthinking."""

from __future__ import annotations

from collections.abc import Sequence


def length_rewards(lengths: Sequence[int], correct: Sequence[bool]) -> list[float]:
    """Length reward of each of the k responses to one prompt (Kimi k1.5, "Length penalty").

    With ``lam = 0.5 - (len_i - min_len) / (max_len - min_len)`` a response gets ``lam`` when
    it is correct and ``min(0, lam)`` when it is wrong: the shortest correct answer earns
    +0.5, the longest -0.5, and a wrong answer is never rewarded for being short. All zero
    when every response has the same length, as then length says nothing.
    """
    if len(lengths) != len(correct):
        raise ValueError(f"{len(lengths)} lengths for {len(correct)} correctness flags")
    if any(n < 0 for n in lengths):
        raise ValueError(f"lengths must be >= 0, got {list(lengths)}")
    if not lengths:
        return []
    shortest, longest = min(lengths), max(lengths)
    if shortest == longest:
        return [0.0] * len(lengths)
    span = longest - shortest
    out = []
    for n, ok in zip(lengths, correct):
        lam = 0.5 - (n - shortest) / span
        out.append(lam if ok else min(0.0, lam))
    return out
