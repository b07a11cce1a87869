"""DPO on each prompt's samples, with k1.5's long2short pairs (§2.4).

Within a group the positive is the shortest correct response (reward ≥ ``correct_reward``)
and the negatives are every wrong response and every correct one at least
``length_ratio`` times longer than the positive. For each (chosen c, rejected r) pair

    ℓ = −log σ(β [(log πθ(c) − log πref(c)) − (log πθ(r) − log πref(r))])

with πref = θ_i, the policy of the iteration; the loss is the mean over all pairs of the
mini-batch (0 when a mini-batch has none). A pair couples two samples that may sit in
different micro-batches, so the step passes every sample's current sequence log-prob
(``needs_current``) and each micro-batch adds Σ_i (∂L/∂ log π_i) log πθ(y_i): exactly the
gradient of the whole, with the loss's value split over the micro-batches.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from k1rl.long2short.pairs import dpo_pairs
from k1rl.registry import LOSSES
from trainer_svc.losses.base import Loss, LossConfig, MiniBatch, Tokens


class DPOConfig(LossConfig):
    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0, description="β, the inverse temperature of the margin.")
    correct_reward: float = Field(0.5, description="A response is correct when its reward "
                                  "is at least this.")
    length_ratio: float = Field(1.5, ge=1, description="Correct responses at least this many "
                                "times longer than the shortest correct one are negatives.")


def long2short_pairs(batch: MiniBatch, correct_reward: float,
                     length_ratio: float) -> list[tuple[int, int]]:
    """(chosen, rejected) sample indices of every group, by k1rl.long2short.pairs' rule
    (the one `k1rl long2short sample` writes its pairs with)."""
    pairs = []
    rewards, lengths = batch.rewards.tolist(), batch.lengths.tolist()
    for g in range(batch.num_groups):
        members = (batch.group == g).nonzero().flatten().tolist()
        local = dpo_pairs([rewards[i] >= correct_reward for i in members],
                          [lengths[i] for i in members], length_ratio)
        pairs += [(members[c], members[r]) for c, r in local]
    return pairs


def dpo_loss(delta: Tensor, pairs: list[tuple[int, int]], beta: float) -> Tensor:
    """Mean over ``pairs`` of −log σ(β (delta_c − delta_r)); ``delta`` = log πθ − log πref."""
    if not pairs:
        return delta.sum() * 0.0
    chosen, rejected = (torch.tensor(x, device=delta.device) for x in zip(*pairs))
    return -F.logsigmoid(beta * (delta[chosen] - delta[rejected])).mean()


@LOSSES.register("dpo")
class DPO(Loss):
    Config = DPOConfig
    needs_current = True

    def __call__(self, tokens: Tokens, batch: MiniBatch) -> Tensor:
        cfg = self.cfg
        seq = tokens.per_sample(tokens.logprobs)
        pairs = long2short_pairs(batch, cfg.correct_reward, cfg.length_ratio)
        current = batch.current.to(seq.device, seq.dtype).requires_grad_(True)
        whole = dpo_loss(current - batch.ref_seq.to(seq.device, seq.dtype), pairs, cfg.beta)
        (coeff,) = torch.autograd.grad(whole, current, allow_unused=True,
                                       materialize_grads=True)
        present = tokens.present
        share = whole.detach() * present.sum() / batch.size
        # (seq − seq.detach()) is 0 in value and carries the gradient coeff · ∇ log π
        return share + (torch.where(present, coeff, 0.0) * (seq - seq.detach())).sum()
