"""Which prompts an RL iteration trains on: uniform, a curriculum, or prioritized (k1.5).

- ``uniform``: every training problem equally likely (``rl.task_weights`` fixes how many
  prompts each level gets).
- ``curriculum``: difficulty labels are the levels' difficulties. ``easy_to_hard`` opens
  the levels one difficulty at a time, evenly over ``rl.curriculum_iterations``
  iterations (sampling uniformly among the open ones); ``warmup_then_hard`` samples all
  levels for ``rl.curriculum_iterations`` iterations, then the hardest difficulty only.
- ``prioritized``: problem i is drawn with probability proportional to
  max(1 - s_i, ``rl.priority_floor``), s_i its tracked success rate (the mean reward
  correctness of its samples so far; unseen problems count as unsolved), without
  replacement within an iteration. The floor keeps solved problems in rotation.

All randomness comes from the loop's RNG, and the sampler's own state (success counts)
is saved with the run, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from k1rl.config import RLConfig
from k1rl.data.tasks import Task


class PromptSampler:
    def __init__(self, cfg: RLConfig, pools: Sequence[Sequence[Task]]) -> None:
        self.cfg = cfg
        self.pools = [list(p) for p in pools]
        self.difficulties = sorted({t.difficulty for pool in self.pools for t in pool})
        # problem id -> [correct samples, samples] (prioritized sampling)
        self.stats: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ drawing
    def sample(self, rng: random.Random, iteration: int) -> list[Task]:
        n = self.cfg.prompts_per_iteration
        if self.cfg.sampler == "curriculum":
            allowed = set(self.open_difficulties(iteration))
            pool = [t for p in self.pools for t in p if t.difficulty in allowed]
            return rng.sample(pool, min(n, len(pool)))
        counts = self.cfg.prompt_counts()
        if counts is None:
            groups = [([t for p in self.pools for t in p], n)]
        else:
            groups = list(zip(self.pools, counts, strict=True))
        draw = self._prioritized if self.cfg.sampler == "prioritized" else _uniform
        return [t for pool, count in groups for t in draw(rng, pool, min(count, len(pool)))]

    def open_difficulties(self, iteration: int) -> list[int]:
        """The difficulties a curriculum samples from at ``iteration``."""
        levels, span = self.difficulties, self.cfg.curriculum_iterations
        if self.cfg.curriculum == "warmup_then_hard":
            return levels if iteration < span else levels[-1:]
        opened = 1 + (iteration * len(levels)) // max(span, 1)
        return levels[: min(opened, len(levels))]

    def weight(self, task: Task) -> float:
        """The prioritized-sampling weight of a problem: max(1 - success rate, floor)."""
        correct, seen = self.stats.get(task.id, (0, 0))
        success = correct / seen if seen else 0.0
        return max(1.0 - success, self.cfg.priority_floor)

    def _prioritized(self, rng: random.Random, pool: list[Task], k: int) -> list[Task]:
        # Weighted sampling without replacement (Efraimidis-Spirakis): the k largest keys
        # u^(1/w), compared as log(u)/w.
        keys = [(math.log(1.0 - rng.random()) / self.weight(t), i) for i, t in enumerate(pool)]
        keys.sort(reverse=True)
        return [pool[i] for _, i in keys[:k]]

    # ------------------------------------------------------------------ feedback
    def update(self, tasks: Sequence[Task], correct: Sequence[bool], n: int) -> None:
        """Record an iteration's outcomes: ``correct`` is task-major, ``n`` per task."""
        for i, ok in enumerate(correct):
            entry = self.stats.setdefault(tasks[i // n].id, [0, 0])
            entry[0] += bool(ok)
            entry[1] += 1

    def state_dict(self) -> dict:
        return {"stats": self.stats}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {k: [int(a), int(b)] for k, (a, b) in state.get("stats", {}).items()}


def _uniform(rng: random.Random, pool: list[Task], k: int) -> list[Task]:
    return rng.sample(pool, k)
