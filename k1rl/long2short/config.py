"""The ``long2short`` section of a run config (k1.5 §2.4). The report gives n = 8 and the
1.5x rule; the rest is chosen here, each choice a field."""

from __future__ import annotations

from pydantic import Field

from k1rl.data.sources import DataSource
from k1rl.yaml_config import Section


class DPOTraining(Section):
    """`k1rl long2short dpo`: passes over the sampled groups, a few prompts per step."""

    epochs: int = Field(1, ge=1, description="Passes over the groups.")
    prompts_per_step: int = Field(16, ge=1, description="Groups (prompts) per trainer call; "
                                  "trainer.minibatches_per_iteration splits each call.")


class Long2ShortRL(Section):
    """`k1rl rl --preset long2short`: RL from the best performance/length model with the
    length penalty on from the first iteration and the rollout length sharply cut."""

    length_penalty_weight: float = Field(
        0.5, gt=0, description="reward.length_penalty_weight (no warm-up). The report gives "
        "no value; 0.5 makes the length reward as large as half the task reward.")
    max_tokens_fraction: float = Field(
        0.5, gt=0, le=1, description="rollout.max_tokens becomes this share of the config's "
        "(at least 1 token): a response that does not end within it scores 0.")


class Long2ShortConfig(Section):
    """Shortest rejection sampling and DPO pairs (`k1rl long2short sample`), DPO
    (`k1rl long2short dpo`) and the long2short RL preset."""

    data: list[DataSource] = Field(default_factory=list, description="Prompts to sample "
                                   "(default: data.train).")
    samples: int = Field(8, ge=2, description="n per prompt (the report: 8).")
    temperature: float | None = Field(None, ge=0, description="Default: rollout.temperature.")
    max_tokens: int | None = Field(None, ge=1, description="Default: rollout.max_tokens.")
    length_ratio: float = Field(1.5, ge=1, description="Correct responses at least this "
                                "many times longer than the shortest correct are DPO "
                                "negatives (the report: 1.5).")
    dpo: DPOTraining = Field(default_factory=DPOTraining, description="DPO's schedule.")
    rl: Long2ShortRL = Field(default_factory=Long2ShortRL, description="The RL preset.")
