"""The ``rl`` section of a run config: the master loop's prompts, their mix and order, how
many per iteration, for how many iterations, and when to evaluate."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from k1rl.registry import METRIC_SINKS, SAMPLERS
from k1rl.schedule import BudgetSchedule
from k1rl.yaml_config import Section


def parse_levels(items: list[str]) -> list[tuple[str, int]]:
    """``family:difficulty`` strings (e.g. ``add:2``) as (family, difficulty) pairs."""
    levels = []
    for item in items:
        family, _, level = item.partition(":")
        if not family or not level.isdigit():
            raise ValueError(f"{item!r} is not family:difficulty (e.g. add:2)")
        levels.append((family, int(level)))
    return levels


class RLConfig(Section):
    """The master loop: what is sampled, how much, for how long."""

    iterations: int = Field(10, ge=1, description="RL iterations (each: rollout, reward, train).")
    prompts_per_iteration: int = Field(
        32, ge=1, description="Prompts sampled per iteration; each gets rollout.n samples."
    )
    tasks: list[str] | None = Field(
        None,
        min_length=1,
        description="Synthetic RL prompt set as family:difficulty levels of k1rl.data.tasks "
        "(null: add:2), when data.train names no source.",
    )
    task_weights: list[float] | None = Field(
        None,
        description="Share of each prompt pool (rl.tasks level, or data.train source) in an "
        "iteration's prompts (normalised; counts rounded by largest remainder). null: "
        "prompts are drawn from all pools' problems together.",
    )
    sampler: str = Field(
        "uniform",
        description="How prompts are drawn, by registry name (k1rl/master/samplers/): "
        "uniform, curriculum (a difficulty schedule) or prioritized (by 1 - tracked "
        "success rate).",
    )
    curriculum: Literal["easy_to_hard", "warmup_then_hard"] = Field(
        "easy_to_hard",
        description="easy_to_hard: open one more difficulty every curriculum_iterations / "
        "#difficulties iterations; warmup_then_hard: all levels for curriculum_iterations, "
        "then the hardest difficulty only.",
    )
    curriculum_iterations: int = Field(
        10, ge=1, description="Length of the curriculum's schedule (see curriculum).")
    priority_floor: float = Field(
        0.05, gt=0, le=1,
        description="Prioritized sampling weight is max(1 - success rate, this): solved "
        "problems still come back now and then.",
    )
    pool_size: int = Field(2000, ge=1, description="Training problems generated per level.")
    keep_checkpoints: int = Field(2, ge=1, description="Trainer checkpoints kept for resume.")
    metrics: list[str] = Field(
        default_factory=lambda: ["jsonl"],
        description="Where each iteration's metrics row goes, by registry name "
        "(k1rl/metrics/): jsonl (the run dir's metrics.jsonl), tensorboard (event files in "
        "tensorboard/), wandb (an offline Weights & Biases run in wandb/), prometheus "
        "(gauges of the last iteration on rl.prometheus_port's /metrics). jsonl is always "
        "written, added when not listed: resume, plots and summaries read it.",
    )
    prometheus_port: int = Field(
        9400, ge=0, le=65535,
        description="Port of the master's Prometheus /metrics when rl.metrics lists "
        "prometheus (0: a free one); its watched calls' losses and re-sends are there too.")
    eval_every: int = Field(
        0,
        ge=0,
        description="Evaluate on the held-out split of rl.tasks every this many iterations "
        "(during the rollout phase, so it costs no extra weight sync) and after the last "
        "one; 0 = never.",
    )
    eval_problems: int = Field(
        200, ge=1, description="Held-out problems per level in each evaluation."
    )
    eval_tasks: list[str] | None = Field(
        None,
        description="The rl.tasks levels evaluated on held-out problems (null: all). With "
        "several, each one's accuracy is logged too (eval_accuracy@<level>); training "
        "accuracy is logged per level for every level (accuracy@<level>).",
    )
    eval_samples: int = Field(
        4,
        ge=1,
        description="Samples per held-out problem at the rollout temperature (pass@1 is "
        "their mean accuracy); one greedy sample is taken as well.",
    )
    schedule: BudgetSchedule = Field(
        default_factory=BudgetSchedule,
        description="Token budget and length-penalty weight by iteration (k1rl/schedule.py): "
        "warm-up, long2short's cut budget, Toggle's alternating phases. Empty: constant.",
    )

    @field_validator("tasks")
    @classmethod
    def _levels(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            parse_levels(v)
        return v

    @field_validator("sampler")
    @classmethod
    def _registered_sampler(cls, v: str) -> str:
        return SAMPLERS.check(v)

    @field_validator("metrics")
    @classmethod
    def _registered_sinks(cls, v: list[str]) -> list[str]:
        for name in v:
            METRIC_SINKS.check(name)
        if len(set(v)) != len(v):
            raise ValueError("a sink is listed twice")
        return v if "jsonl" in v else ["jsonl", *v]

    @model_validator(mode="after")
    def _mix(self) -> RLConfig:
        if self.task_weights is not None and self.sampler == "curriculum":
            raise ValueError("task_weights and sampler 'curriculum' both decide which levels "
                             "an iteration draws from: use one")
        if self.task_weights is not None:
            if self.tasks is not None and len(self.task_weights) != len(self.tasks):
                raise ValueError(f"task_weights: {len(self.task_weights)} weights for "
                                 f"{len(self.tasks)} tasks")
            if not all(w > 0 and math.isfinite(w) for w in self.task_weights):
                raise ValueError(f"task_weights must all be > 0, got {self.task_weights}")
        if self.eval_tasks is not None and self.tasks is None:
            raise ValueError("eval_tasks names rl.tasks levels, but rl.tasks is not set")
        unknown = set(self.eval_tasks or ()) - set(self.tasks or ())
        if unknown or self.eval_tasks == []:
            raise ValueError(f"eval_tasks must be a non-empty subset of tasks; not in tasks: "
                             f"{sorted(unknown)}")
        return self

    @property
    def headline_tasks(self) -> list[str]:
        """The synthetic levels evaluated on held-out problems (eval_accuracy averages over
        them); none when the prompts come from data sources."""
        return self.eval_tasks or self.tasks or []

    def prompt_counts(self) -> list[int] | None:
        """Prompts per pool in an iteration (None: drawn from all together)."""
        if self.task_weights is None:
            return None
        total = sum(self.task_weights)
        exact = [self.prompts_per_iteration * w / total for w in self.task_weights]
        counts = [int(x) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
        for i in by_remainder[: self.prompts_per_iteration - sum(counts)]:
            counts[i] += 1
        return counts
