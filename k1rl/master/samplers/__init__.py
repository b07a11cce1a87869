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

from k1rl.data.problem import ChainedPool, Problem
from k1rl.registry import SAMPLERS
from k1rl.rl_config import RLConfig

register = SAMPLERS.register


class PromptSampler(ABC):
    """Draws an iteration's prompts from the training pools (k1rl/master/problems.py).

    ``pools`` holds each pool's problems, in config order (rl.tasks levels or data.train
    sources); a pool is any sequence, and one over a dataset builds only the problems
    drawn. ``sample`` takes all its randomness from ``rng``; ``update`` hears how the
    drawn prompts went.
    """

    name: str = ""

    def __init__(self, cfg: RLConfig, pools: Sequence[Sequence[Problem]]) -> None:
        self.cfg = cfg
        self.pools = list(pools)

    @abstractmethod
    def sample(self, rng: random.Random, iteration: int) -> list[Problem]:
        """The prompts of ``iteration`` (at most rl.prompts_per_iteration)."""

    def update(self, tasks: Sequence[Problem], correct: Sequence[bool], n: int) -> None:
        """Record an iteration's outcomes: ``correct`` is task-major, ``n`` per task.
        Samplers that do not adapt ignore it."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; run states of older versions hold ``stats`` for
        every sampler, which the ones without state ignore."""

    def problems(self) -> Sequence[Problem]:
        """Every pool's problems together, in pool order."""
        return self.pools[0] if len(self.pools) == 1 else ChainedPool(self.pools)

    def quotas(self) -> list[tuple[Sequence[Problem], int]]:
        """(problems, prompts to draw from them): one entry per pool when rl.task_weights
        fixes each pool's count, else one for all pools together."""
        counts = self.cfg.prompt_counts()
        if counts is None:
            groups = [(self.problems(), self.cfg.prompts_per_iteration)]
        else:
            groups = list(zip(self.pools, counts, strict=True))
        return [(pool, min(count, len(pool))) for pool, count in groups]


def available() -> list[str]:
    return SAMPLERS.names()


def create(cfg: RLConfig, pools: Sequence[Sequence[Problem]]) -> PromptSampler:
    """A new sampler of the kind ``cfg.sampler`` names, over ``pools`` (one per level)."""
    return SAMPLERS.get(cfg.sampler)(cfg, pools)
