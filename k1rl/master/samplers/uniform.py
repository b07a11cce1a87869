"""Uniform sampling: every training problem equally likely.

``rl.task_weights`` fixes how many prompts each level gets; without it all levels'
problems are drawn from together.
"""

from __future__ import annotations

import random

from k1rl.data.problem import Problem
from k1rl.master.samplers import PromptSampler, register


@register("uniform")
class Uniform(PromptSampler):
    def sample(self, rng: random.Random, iteration: int) -> list[Problem]:
        return [t for pool, k in self.quotas() for t in rng.sample(pool, k)]
