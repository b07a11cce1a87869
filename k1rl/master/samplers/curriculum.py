"""Curriculum sampling (k1.5): difficulty labels are the levels' difficulties.

``easy_to_hard`` opens the levels one difficulty at a time, evenly over
``rl.curriculum_iterations`` iterations (sampling uniformly among the open ones);
``warmup_then_hard`` samples all levels for ``rl.curriculum_iterations`` iterations, then
the hardest difficulty only. The schedule decides the levels, so ``rl.task_weights`` is
refused beside it (at config load).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from k1rl.config import RLConfig
from k1rl.data.tasks import Task
from k1rl.master.samplers import PromptSampler, register


@register("curriculum")
class Curriculum(PromptSampler):
    def __init__(self, cfg: RLConfig, pools: Sequence[Sequence[Task]]) -> None:
        super().__init__(cfg, pools)
        self.difficulties = sorted({t.difficulty for t in self.problems()})

    def sample(self, rng: random.Random, iteration: int) -> list[Task]:
        allowed = set(self.open_difficulties(iteration))
        pool = [t for t in self.problems() if t.difficulty in allowed]
        return rng.sample(pool, min(self.cfg.prompts_per_iteration, len(pool)))

    def open_difficulties(self, iteration: int) -> list[int]:
        """The difficulties the curriculum samples from at ``iteration``."""
        levels, span = self.difficulties, self.cfg.curriculum_iterations
        if self.cfg.curriculum == "warmup_then_hard":
            return levels if iteration < span else levels[-1:]
        opened = 1 + (iteration * len(levels)) // max(span, 1)
        return levels[: min(opened, len(levels))]
