"""GSPO: the clipped ratio per sequence instead of per token (Qwen, 2025).

s_j = exp((1/|y_j|) Σ_t log(πθ(y_t) / πθi(y_t))), the length-normalised sequence ratio,
and the loss is the mean over samples of −min(s_j A_j, clip(s_j, 1 − ε_low, 1 + ε_high) A_j),
with A_j group-normalised as in GRPO. The clip range is narrow (3e-4 / 4e-4 in the paper)
since s_j is a geometric mean. Under a mismatch correction each sample's term is weighted by
its tokens' mean weight.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from k1rl.registry import LOSSES
from trainer_svc.losses.base import (
    MiniBatch,
    PolicyGradientConfig,
    PolicyGradientLoss,
    Tokens,
    group_advantages,
)
from trainer_svc.losses.grpo import clipped_surrogate


class GSPOConfig(PolicyGradientConfig):
    name: Literal["gspo"] = "gspo"
    clip_low: float = Field(3e-4, gt=0, lt=1, description="ε_low of the sequence ratio.")
    clip_high: float = Field(4e-4, gt=0, description="ε_high of the sequence ratio.")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="As GRPO's: std of the group, of the mini-batch, or none.")


@LOSSES.register("gspo")
class GSPO(PolicyGradientLoss):
    Config = GSPOConfig

    def __call__(self, tokens: Tokens, batch: MiniBatch) -> Tensor:
        cfg = self.cfg
        dtype, device = tokens.logprobs.dtype, tokens.logprobs.device
        counts = batch.tokens.to(device, dtype).clamp(min=1)
        mean_log_ratio = tokens.per_sample(tokens.log_ratio) / counts
        weight = tokens.per_sample(tokens.weight) / counts
        advantage = group_advantages(batch, cfg.scale_rewards).to(device, dtype)
        per_sample = weight * clipped_surrogate(mean_log_ratio.exp(), advantage,
                                                cfg.clip_low, cfg.clip_high)
        return per_sample[tokens.present].sum() / batch.size
