"""Difficulty (k1.5 §2.1): the pass rate of samples drawn at a relatively high temperature
from the SFT model; a lower pass rate is a harder prompt."""

from __future__ import annotations

from collections.abc import Sequence


def pass_rate(correct: Sequence[bool]) -> float:
    if not correct:
        raise ValueError("a pass rate needs at least one sample")
    return sum(map(bool, correct)) / len(correct)


def difficulty(rate: float) -> float:
    """The ``difficulty`` label written for a pass rate: 1 - rate, so that higher is harder
    as the curriculum sampler orders labels (rounded: equal rates make one level)."""
    return round(1.0 - rate, 6)
