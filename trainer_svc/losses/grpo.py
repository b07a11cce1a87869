"""GRPO: PPO's clipped ratio per token with group-normalised advantages (DeepSeekMath).

For sample j of a group, A_j = (r_j − mean_g r) / (std_g r + ε) (``scale_rewards``), and
each of its tokens t contributes

    −min(ρ_t A_j, clip(ρ_t, 1 − ε_low, 1 + ε_high) A_j) · w_t  [+ β · k3(πθi ‖ πθ)]

with ρ_t = πθ(y_t) / πθi(y_t), the ratio to the policy that generated the iteration's
samples (θ_i), w_t the mismatch correction, and k3 = e^{−x} + x − 1 at x = log ρ_t (the
KL estimator, here towards θ_i: the iteration's reference, as mirror descent's τ term).
``ε_high`` > ``ε_low`` is DAPO's clip-higher. ``aggregation`` chooses how token terms
become the loss (base.aggregate): ``token_mean`` is DAPO's (and TRL's ``dapo``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from k1rl.registry import LOSSES
from trainer_svc.losses.base import (
    MiniBatch,
    PolicyGradientConfig,
    PolicyGradientLoss,
    Tokens,
    aggregate,
    group_advantages,
)


class GRPOConfig(PolicyGradientConfig):
    name: Literal["grpo"] = "grpo"
    clip_low: float = Field(0.2, gt=0, lt=1, description="ε_low: ratio floor 1 − ε_low.")
    clip_high: float = Field(0.28, gt=0, description="ε_high: ratio ceiling 1 + ε_high "
                             "(DAPO's clip-higher; 0.2 = symmetric PPO).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide the centred rewards by the group's std (GRPO), the "
        "mini-batch's, or not at all (Dr. GRPO).")
    aggregation: Literal["token_mean", "sequence_mean", "sequence_sum"] = Field(
        "token_mean", description="token_mean (DAPO), sequence_mean (GRPO), sequence_sum "
        "(Dr. GRPO, divided by max_tokens).")
    max_tokens: int = Field(1, ge=1, description="Dr. GRPO's normaliser for sequence_sum "
                            "(set it to the rollout's max_tokens).")
    kl_coef: float = Field(0.0, ge=0, description="β of the k3 KL towards θ_i (0: off).")


def clipped_surrogate(ratio: Tensor, advantage: Tensor, low: float, high: float) -> Tensor:
    """−min(ρA, clip(ρ, 1 − low, 1 + high) A), elementwise."""
    return -torch.minimum(ratio * advantage, ratio.clamp(1 - low, 1 + high) * advantage)


@LOSSES.register("grpo")
class GRPO(PolicyGradientLoss):
    Config = GRPOConfig

    def __call__(self, tokens: Tokens, batch: MiniBatch) -> Tensor:
        cfg = self.cfg
        advantage = group_advantages(batch, cfg.scale_rewards)
        advantage = advantage.to(tokens.logprobs.device, tokens.logprobs.dtype)[tokens.sample]
        log_ratio = tokens.log_ratio
        per_token = tokens.weight * clipped_surrogate(log_ratio.exp(), advantage,
                                                      cfg.clip_low, cfg.clip_high)
        if cfg.kl_coef:
            per_token = per_token + cfg.kl_coef * ((-log_ratio).exp() + log_ratio - 1)
        return aggregate(per_token, tokens, batch, cfg.aggregation, cfg.max_tokens)
