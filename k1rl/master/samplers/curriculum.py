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

from k1rl.data.problem import Problem, pool_values
from k1rl.master.samplers import PromptSampler, register
from k1rl.rl_config import RLConfig


@register("curriculum")
class Curriculum(PromptSampler):
    def __init__(self, cfg: RLConfig, pools: Sequence[Sequence[Problem]]) -> None:
        super().__init__(cfg, pools)
        # one difficulty per problem, pool by pool, read without building the problems
        self.labels = [pool_values(pool, "difficulty") for pool in self.pools]
        unlabelled = sum(d is None for labels in self.labels for d in labels)
        if unlabelled:
            raise ValueError(f"rl.sampler curriculum needs a difficulty for every problem; "
                             f"{unlabelled} have none (map one with fields.difficulty)")
        self.difficulties = sorted({d for labels in self.labels for d in labels})

    def sample(self, rng: random.Random, iteration: int) -> list[Problem]:
        allowed = set(self.open_difficulties(iteration))
        open_ = [(k, i) for k, labels in enumerate(self.labels)
                 for i, d in enumerate(labels) if d in allowed]
        drawn = rng.sample(open_, min(self.cfg.prompts_per_iteration, len(open_)))
        return [self.pools[k][i] for k, i in drawn]

    def open_difficulties(self, iteration: int) -> list[float]:
        """The difficulties the curriculum samples from at ``iteration``."""
        levels, span = self.difficulties, self.cfg.curriculum_iterations
        if self.cfg.curriculum == "warmup_then_hard":
            return levels if iteration < span else levels[-1:]
        opened = 1 + (iteration * len(levels)) // max(span, 1)
        return levels[: min(opened, len(levels))]
