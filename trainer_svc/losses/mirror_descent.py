"""Online policy mirror descent, the RL objective of Kimi k1.5 (arXiv 2501.12599, eq. 3).

Iteration i samples k responses y_1..y_k per prompt x from the reference policy π_θi
(the policy at the start of the iteration) and ascends

    (1/k) Σ_j [ ∇ log πθ(y_j|x) (r_j − b) − (τ/2) ∇ (log πθ(y_j|x) − log πθi(y_j|x))² ]

where log π of a response is the sum of its token log-probs and b is the group's
baseline: the mean reward r̄ (what the report uses in practice) or the τ log Z estimate
τ log((1/k) Σ_j exp(r_j/τ)). :func:`mirror_descent_loss` is the loss to *minimise*
whose gradient is the negative of that ascent direction:

    L(θ) = Σ_g 1/(G k_g) Σ_{j in g} [ −(r_j − b_g) log πθ(y_j|x)
                                       + (τ/2) (log πθ(y_j|x) − log πθi(y_j|x))² ]

Normalisation: the report's 1/k averages over one prompt's samples, the expectation over
prompts becomes a mean over the G groups of the batch, so every prompt weighs the same
whatever its k (a plain mean over all samples would weigh prompts by their k). No
division by response length: log π is a sum over tokens, as in the report.

With a train/inference mismatch correction (``mismatch``) the policy-gradient term's
log π is the weighted token sum Σ_t w_t log πθ(y_t); the τ term stays unweighted.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from k1rl.registry import LOSSES
from trainer_svc.losses.base import MiniBatch, PolicyGradientConfig, PolicyGradientLoss, Tokens


class MirrorDescentConfig(PolicyGradientConfig):
    """Hyper-parameters of the mirror-descent loss; bad values fail when the model is built."""

    name: Literal["mirror_descent"] = "mirror_descent"
    tau: float = Field(
        0.1,
        ge=0,
        allow_inf_nan=False,
        description="τ, weight of the KL(πθ || πθi) regulariser towards the reference policy "
        "(the report gives no value). 0 leaves a plain policy gradient with a baseline.",
    )
    baseline: Literal["mean", "tau_log_z"] = Field(
        "mean",
        description="Per-prompt baseline b: 'mean' = r̄, the mean reward of the prompt's k "
        "samples (the report: 'in practice the mean reward works'); 'tau_log_z' = "
        "τ log((1/k) Σ_j exp(r_j/τ)), the estimate of τ log Z (needs tau > 0).",
    )

    @model_validator(mode="after")
    def _log_z_needs_tau(self) -> MirrorDescentConfig:
        if self.baseline == "tau_log_z" and self.tau <= 0:
            raise ValueError("baseline 'tau_log_z' needs tau > 0 (τ log Z is undefined at τ = 0)")
        return self


def mirror_descent_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    cfg: MirrorDescentConfig,
    present: Tensor | None = None,
    pg_logprobs: Tensor | None = None,
) -> Tensor:
    """The mirror-descent loss (module docstring) over one batch of whole groups.

    All arguments are ``[N]`` tensors, one entry per sampled response: ``logprobs`` =
    log πθ(y|x) (differentiable), ``ref_logprobs`` = log πθi(y|x) (treated as
    constants), ``rewards``, and integer ``group_ids`` (the responses to one prompt
    share an id). Baselines, k and G always come from all N samples; ``present``
    (bool ``[N]``, default all) selects whose terms this call adds, so the calls over a
    partition of the samples (micro-batches) sum to the whole batch's loss, and the
    entries of ``logprobs`` outside ``present`` are ignored. ``pg_logprobs`` (default
    ``logprobs``) is what the policy-gradient term differentiates: the importance-weighted
    token sums under a mismatch correction.
    """
    if logprobs.dim() != 1 or logprobs.numel() == 0:
        raise ValueError(
            f"logprobs must be 1-D with at least one sample, got shape {tuple(logprobs.shape)}"
        )
    n = logprobs.numel()
    for name, t in (("ref_logprobs", ref_logprobs), ("rewards", rewards), ("group_ids", group_ids)):
        if t.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logprobs ({n},)")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be integers, got {group_ids.dtype}")
    if not (torch.isfinite(rewards).all() and torch.isfinite(ref_logprobs).all()):
        raise ValueError("rewards and ref_logprobs must be finite")
    if present is None:
        present = torch.ones(n, dtype=torch.bool, device=logprobs.device)
    elif present.shape != logprobs.shape or present.dtype != torch.bool:
        raise ValueError(f"present must be a bool tensor of shape ({n},)")

    _, group = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group.max()) + 1
    rewards64 = rewards.detach().double()
    counts = torch.zeros(num_groups, dtype=torch.float64, device=rewards.device)
    counts.index_add_(0, group, torch.ones_like(rewards64))
    if cfg.baseline == "mean":
        sums = torch.zeros_like(counts).index_add_(0, group, rewards64)
        baseline = sums / counts
    else:
        # logsumexp per group, shifted by the group's max so exp never overflows
        scaled = rewards64 / cfg.tau
        peak = torch.full_like(counts, -torch.inf).scatter_reduce(0, group, scaled, "amax")
        mass = torch.zeros_like(counts).index_add_(0, group, torch.exp(scaled - peak[group]))
        baseline = cfg.tau * (peak + torch.log(mass / counts))
    advantage = (rewards64 - baseline[group]).to(logprobs.dtype)
    weight = (1.0 / (num_groups * counts[group])).to(logprobs.dtype)

    ref = ref_logprobs.detach().to(logprobs.dtype)
    # absent entries may hold anything (even NaN): keep them out of values and gradients
    logprobs = torch.where(present, logprobs, ref)
    pg = logprobs if pg_logprobs is None else torch.where(present, pg_logprobs, 0.0)
    log_ratio = logprobs - ref
    per_sample = -advantage * pg + 0.5 * cfg.tau * log_ratio.square()
    return torch.where(present, weight * per_sample, 0.0).sum()


@LOSSES.register("mirror_descent")
class MirrorDescent(PolicyGradientLoss):
    """k1.5's online policy mirror descent over whole sequences (eq. 3)."""

    Config = MirrorDescentConfig

    def __call__(self, tokens: Tokens, batch: MiniBatch) -> Tensor:
        seq = tokens.per_sample(tokens.logprobs)
        ref = tokens.per_sample(tokens.ref)
        weighted = None
        if self.cfg.mismatch.mode != "none":
            weighted = tokens.per_sample(tokens.weight * tokens.logprobs)
        rewards = batch.rewards.to(seq.device, seq.dtype)
        # absent samples still count in k, G and the baselines: the call is one share
        return mirror_descent_loss(seq, ref, rewards, batch.group.to(seq.device), self.cfg,
                                   present=tokens.present, pg_logprobs=weighted)

    def metrics(self, log_ratio_sq: float) -> dict[str, float]:
        return {"kl_term": 0.5 * self.cfg.tau * log_ratio_sq}


