"""Repetition detection on generated token ids (k1.5 stops looping trajectories early).

Two signals, both cheap per token and both with thresholds from
:class:`k1rl.config.RepetitionConfig`:

- a periodic suffix: the last ``span`` tokens are one block of ``period`` tokens
  repeated, ``span >= min_span`` and ``span >= min_repeats * period`` (a model stuck on
  "= 0, write 0; = 0, write 0; ..." or on one token). For every period p up to
  ``max_period`` the detector keeps how many trailing tokens equal the token p before
  them, so a new token costs O(max_period).
- a recurring n-gram: within the last ``ngram_window`` tokens one ``ngram``-token
  sequence occurs ``ngram_max_count`` times without overlapping itself (loops with
  varying filler between the repeats, which are not periodic; runs of one short block
  are the periodic signal's).

Legitimate text repeats too (a column sum of zeros, a number with many equal digits):
the defaults are set so that no target of the project's task families triggers them,
which a test checks.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from k1rl.config import RepetitionConfig


@dataclass(frozen=True)
class Repetition:
    """Where a repetition was established: ``tokens[start:end]`` is the repeating part
    and ``end`` the length at which the detector fired (keep ``tokens[:end]``)."""

    kind: Literal["periodic", "ngram"]
    start: int
    end: int
    unit: int      # the period, or n of the n-gram
    repeats: int


class RepetitionDetector:
    """Feed one trajectory's tokens with :meth:`push` (or :meth:`scan` a whole list)."""

    def __init__(self, cfg: RepetitionConfig) -> None:
        self.cfg = cfg
        self.tokens: list[int] = []
        # run[p]: trailing tokens t[i] with t[i] == t[i - p]
        self._run = [0] * (cfg.max_period + 1)
        # the window's n-grams, each with whether it counted (did not overlap the last
        # counted occurrence of the same n-gram)
        self._grams: deque[tuple[tuple[int, ...], bool]] = deque()
        self._counts: Counter[tuple[int, ...]] = Counter()
        self._last_counted: dict[tuple[int, ...], int] = {}

    def push(self, token: int) -> Repetition | None:
        """Add the next token; the repetition it completes, if any."""
        t = self.tokens
        t.append(token)
        n = len(t)
        found = None
        for p in range(1, min(self.cfg.max_period, n - 1) + 1):
            self._run[p] = self._run[p] + 1 if t[-1] == t[-1 - p] else 0
            span = self._run[p] + p
            if found is None and span >= self.cfg.min_span and \
                    span >= self.cfg.min_repeats * p:
                found = Repetition("periodic", n - span, n, p, span // p)
        if found is None and self.cfg.ngram > 0:
            found = self._push_ngram()
        return found

    def _push_ngram(self) -> Repetition | None:
        cfg, t = self.cfg, self.tokens
        if len(t) < cfg.ngram:
            return None
        gram, start = tuple(t[-cfg.ngram:]), len(t) - cfg.ngram
        counts = start >= self._last_counted.get(gram, -cfg.ngram) + cfg.ngram
        self._grams.append((gram, counts))
        if counts:
            self._counts[gram] += 1
            self._last_counted[gram] = start
        if len(self._grams) > cfg.ngram_window - cfg.ngram + 1:
            old, counted = self._grams.popleft()
            if counted:
                self._counts[old] -= 1
                if not self._counts[old]:
                    del self._counts[old]
        if not counts or self._counts[gram] < cfg.ngram_max_count:
            return None
        # the first counted occurrence still in the window starts the repeating part
        window_start = len(t) - cfg.ngram - len(self._grams) + 1
        first = next(i for i, (g, c) in enumerate(self._grams) if c and g == gram)
        return Repetition("ngram", window_start + first, len(t), cfg.ngram,
                          self._counts[gram])

    def scan(self, tokens: Iterable[int]) -> Repetition | None:
        """The first repetition in ``tokens`` (pushed one by one), or None."""
        for token in tokens:
            found = self.push(token)
            if found is not None:
                return found
        return None


def find_repetition(tokens: Sequence[int], cfg: RepetitionConfig) -> Repetition | None:
    """The first point at which ``tokens`` repeat (None when disabled or they never do)."""
    if not cfg.enabled:
        return None
    return RepetitionDetector(cfg).scan(tokens)


class SegmentWatch:
    """Watches a trajectory's new segment as the engine produces it, so a loop is stopped
    when it is established rather than at the segment's token budget.

    ``before``: the trajectory's earlier segments, where a loop may have begun.
    """

    def __init__(self, cfg: RepetitionConfig, before: Sequence[int] = ()) -> None:
        self._detector = RepetitionDetector(cfg)
        self._before = len(before)
        # a loop already complete in ``before`` (thresholds changed on resume, say):
        # the segment is cut before its first token
        self.cut: int | None = 0 if self._detector.scan(before) is not None else None

    def feed(self, tokens: Iterable[int]) -> int | None:
        """Add the segment's next tokens; once a loop is established, the segment's
        length to keep (the tokens up to where it was established), else None."""
        if self.cut is None and (loop := self._detector.scan(tokens)) is not None:
            self.cut = loop.end - self._before
        return self.cut
