"""Which of a prompt's samples teach brevity (k1.5 §2.4): the shortest correct response is
the SFT target of shortest rejection sampling and DPO's positive; DPO's negatives are the
wrong responses and the correct ones at least ``length_ratio`` times longer than it.

One rule for the data `k1rl long2short sample` writes and for trainer_svc's ``dpo`` loss,
which pairs each group's samples the same way.
"""

from __future__ import annotations

from collections.abc import Sequence


def shortest_correct(correct: Sequence[bool], lengths: Sequence[int]) -> int | None:
    """The index of the shortest correct sample (the first of equals), or None."""
    right = [i for i, ok in enumerate(correct) if ok]
    return min(right, key=lambda i: (lengths[i], i)) if right else None


def dpo_pairs(correct: Sequence[bool], lengths: Sequence[int],
              length_ratio: float = 1.5) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs of one prompt's samples; none without a correct one."""
    if len(correct) != len(lengths):
        raise ValueError(f"{len(correct)} verdicts for {len(lengths)} lengths")
    chosen = shortest_correct(correct, lengths)
    if chosen is None:
        return []
    return [(chosen, i) for i in range(len(correct)) if i != chosen and (
        not correct[i] or lengths[i] >= length_ratio * lengths[chosen])]
