"""Prioritized sampling (k1.5): problem i is drawn with probability proportional to
max(1 - s_i, ``rl.priority_floor``), s_i its tracked success rate (the mean reward
correctness of its samples so far; an unseen problem counts as its curated pass rate
(`k1rl curate`), else as unsolved), without replacement within an iteration. The floor
keeps solved problems in rotation. ``rl.task_weights`` fixes how many prompts each level
gets, as for uniform sampling.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from k1rl.data.problem import Problem, pool_values
from k1rl.master.samplers import PromptSampler, register
from k1rl.rl_config import RLConfig


@register("prioritized")
class Prioritized(PromptSampler):
    def __init__(self, cfg: RLConfig, pools: Sequence[Sequence[Problem]]) -> None:
        super().__init__(cfg, pools)
        self.stats: dict[str, list[int]] = {}  # problem id -> [correct samples, samples]

    def sample(self, rng: random.Random, iteration: int) -> list[Problem]:
        return [t for pool, k in self.quotas() for t in self._draw(rng, pool, k)]

    def weight(self, problem: Problem) -> float:
        """A problem's sampling weight: max(1 - success rate, floor)."""
        return self._weight(problem.id, getattr(problem, "pass_rate", None))

    def _weight(self, problem_id: str, prior: float | None) -> float:
        correct, seen = self.stats.get(problem_id, (0, 0))
        success = correct / seen if seen else (prior or 0.0)
        return max(1.0 - success, self.cfg.priority_floor)

    def _draw(self, rng: random.Random, pool: Sequence[Problem], k: int) -> list[Problem]:
        # Weighted sampling without replacement (Efraimidis-Spirakis): the k largest keys
        # u^(1/w), compared as log(u)/w.
        ids, priors = pool_values(pool, "id"), pool_values(pool, "pass_rate")
        keys = [(math.log(1.0 - rng.random()) / self._weight(pid, prior), i)
                for i, (pid, prior) in enumerate(zip(ids, priors))]
        keys.sort(reverse=True)
        return [pool[i] for _, i in keys[:k]]

    def update(self, tasks: Sequence[Problem], correct: Sequence[bool], n: int) -> None:
        for i, ok in enumerate(correct):
            entry = self.stats.setdefault(tasks[i // n].id, [0, 0])
            entry[0] += bool(ok)
            entry[1] += 1

    def state_dict(self) -> dict:
        return {"stats": self.stats}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {k: [int(a), int(b)] for k, (a, b) in state.get("stats", {}).items()}
