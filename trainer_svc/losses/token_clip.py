"""Mirror descent per token, with tokens whose log-ratio drifted too far left out.

The seeds' later-report extra: k1.5's objective (mirror_descent.py) with its τ term taken
per token, and every token whose |log πθ(y_t) − log πθi(y_t)| exceeds ``max_log_ratio``
dropped from the loss (no gradient at all): a step can no longer push one token's
probability far from the reference, whatever the reward, while the rest of the sequence
still learns. Per prompt-normalised like mirror descent:

    L = Σ_g 1/(G k_g) Σ_{j in g} Σ_t m_jt [ −(r_j − r̄_g) w_jt log πθ(y_t)
                                           + (τ/2) (log πθ(y_t) − log πθi(y_t))² ]

with m_jt = 1[|log-ratio| ≤ max_log_ratio] (a constant) and w the mismatch correction.
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
    prompt_mean,
)


class TokenClipConfig(PolicyGradientConfig):
    name: Literal["token_clip"] = "token_clip"
    tau: float = Field(0.1, ge=0, allow_inf_nan=False, description="τ of the per-token "
                       "squared log-ratio towards θ_i.")
    max_log_ratio: float = Field(0.2, gt=0, description="Tokens whose |log πθ − log πθi| "
                                 "exceeds this carry no gradient.")


@LOSSES.register("token_clip")
class TokenClip(PolicyGradientLoss):
    Config = TokenClipConfig

    def __call__(self, tokens: Tokens, batch: MiniBatch) -> Tensor:
        cfg = self.cfg
        log_ratio = tokens.log_ratio
        keep = (log_ratio.detach().abs() <= cfg.max_log_ratio).to(log_ratio.dtype)
        advantage = group_advantages(batch, "none").to(log_ratio.device, log_ratio.dtype)
        per_token = keep * (-advantage[tokens.sample] * tokens.weight * tokens.logprobs
                            + 0.5 * cfg.tau * log_ratio.square())
        return prompt_mean(tokens.per_sample(per_token), tokens, batch)

    def metrics(self, log_ratio_sq: float) -> dict[str, float]:
        return {"kl_term": 0.5 * self.cfg.tau * log_ratio_sq}


