"""Prompt samplers, registered by name (``rl.sampler``): which prompts an iteration trains on.

One module per sampler, named after its term in the k1.5 report: ``uniform``,
``curriculum`` and ``prioritized``. A sampler defined elsewhere registers itself the same
way (``@register("name")``) and is selected by config once its module is imported
(``RunConfig.plugins``).

All randomness comes from the loop's RNG, and a sampler's own state (prioritized
sampling's success counts) is saved with the run, so a resumed run draws exactly what an
uninterrupted one would.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence

from k1rl.config import RLConfig
from k1rl.data.tasks import Task
from k1rl.registry import SAMPLERS

register = SAMPLERS.register


class PromptSampler(ABC):
    """Draws an iteration's prompts from the rl.tasks levels' training problems.

    ``pools`` holds each level's problems, in rl.tasks order. ``sample`` takes all its
    randomness from ``rng``; ``update`` hears how the drawn prompts went.
    """

    name: str = ""

    def __init__(self, cfg: RLConfig, pools: Sequence[Sequence[Task]]) -> None:
        self.cfg = cfg
        self.pools = [list(p) for p in pools]

    @abstractmethod
    def sample(self, rng: random.Random, iteration: int) -> list[Task]:
        """The prompts of ``iteration`` (at most rl.prompts_per_iteration)."""

    def update(self, tasks: Sequence[Task], correct: Sequence[bool], n: int) -> None:
        """Record an iteration's outcomes: ``correct`` is task-major, ``n`` per task.
        Samplers that do not adapt ignore it."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; run states of older versions hold ``stats`` for
        every sampler, which the ones without state ignore."""

    def problems(self) -> list[Task]:
        """Every level's problems together, in level order."""
        return [t for pool in self.pools for t in pool]

    def quotas(self) -> list[tuple[list[Task], int]]:
        """(problems, prompts to draw from them): one entry per level when rl.task_weights
        fixes each level's count, else one for all levels together."""
        counts = self.cfg.prompt_counts()
        if counts is None:
            groups = [(self.problems(), self.cfg.prompts_per_iteration)]
        else:
            groups = list(zip(self.pools, counts, strict=True))
        return [(pool, min(count, len(pool))) for pool, count in groups]


def available() -> list[str]:
    return SAMPLERS.names()


def create(cfg: RLConfig, pools: Sequence[Sequence[Task]]) -> PromptSampler:
    """A new sampler of the kind ``cfg.sampler`` names, over ``pools`` (one per level)."""
    return SAMPLERS.get(cfg.sampler)(cfg, pools)
