"""Long2short RL (k1.5 §2.4): after standard RL, from the model with the best
performance/length trade-off, RL again with the length penalty on from the first iteration
and a sharply cut maximum rollout length. `k1rl rl --preset long2short` applies it to the
run config, whose long2short.rl section holds the two numbers."""

from __future__ import annotations

import math

from k1rl.config import RunConfig


def long2short_rl(cfg: RunConfig) -> RunConfig:
    """``cfg`` as a long2short RL run (validated again, so a token budget of rl.schedule
    above the cut length is an error naming it)."""
    preset = cfg.long2short.rl
    data = cfg.model_dump()
    data["reward"] |= {"length_penalty_weight": preset.length_penalty_weight,
                       "length_penalty_warmup_iters": 0}
    cut = max(1, math.floor(cfg.rollout.max_tokens * preset.max_tokens_fraction))
    data["rollout"] |= {"max_tokens": cut}
    return RunConfig.model_validate(data)


PRESETS = {"long2short": long2short_rl}
