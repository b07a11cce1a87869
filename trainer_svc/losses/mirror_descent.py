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

The helpers at the end turn a batch of TrainSamples into mini-batches of whole groups
(a group's baseline needs all its k rewards).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from k1rl.protocol import TrainBatch, TrainSample


class MirrorDescentConfig(BaseModel):
    """Hyper-parameters of the mirror-descent loss; bad values fail when the model is built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
) -> Tensor:
    """The mirror-descent loss (module docstring) over one batch of whole groups.

    All arguments are ``[N]`` tensors, one entry per sampled response: ``logprobs`` =
    log πθ(y|x) (differentiable), ``ref_logprobs`` = log πθi(y|x) (treated as
    constants), ``rewards``, and integer ``group_ids`` (the responses to one prompt
    share an id). Baselines, k and G always come from all N samples; ``present``
    (bool ``[N]``, default all) selects whose terms this call adds, so the calls over a
    partition of the samples (micro-batches) sum to the whole batch's loss, and the
    entries of ``logprobs`` outside ``present`` are ignored.
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
    log_ratio = logprobs - ref
    per_sample = -advantage * logprobs + 0.5 * cfg.tau * log_ratio.square()
    return torch.where(present, weight * per_sample, 0.0).sum()


# ------------------------------------------------------------------ batches of groups

_SAMPLE_FIELDS = ("group_id", "prompt_token_ids", "response_token_ids", "rollout_logprobs",
                  "reward", "policy_version")


def as_train_samples(
    samples: TrainBatch | Sequence[TrainSample | tuple], policy_version: int
) -> list[TrainSample]:
    """Validated TrainSamples; a 5-tuple gets the trainer's current ``policy_version``."""
    if isinstance(samples, TrainBatch):
        samples = samples.samples
    out = []
    for i, sample in enumerate(samples):
        if isinstance(sample, (tuple, list)) and len(sample) in (5, 6):
            # zip stops at the 6 fields, so a 6-tuple keeps its own policy_version
            sample = TrainSample(**dict(zip(_SAMPLE_FIELDS, (*sample, policy_version))))
        elif not isinstance(sample, TrainSample):
            raise TypeError(f"sample {i}: expected a TrainSample or a tuple of "
                            f"{', '.join(_SAMPLE_FIELDS)} (the last optional), got {sample!r:.80}")
        if len(sample.rollout_logprobs) != len(sample.response_token_ids):
            raise ValueError(f"sample {i}: {len(sample.rollout_logprobs)} rollout_logprobs for "
                             f"{len(sample.response_token_ids)} response tokens")
        if not math.isfinite(sample.reward):
            raise ValueError(f"sample {i}: reward {sample.reward} is not finite")
        out.append(sample)
    if not out:
        raise ValueError("no samples to train on")
    return out


def segment_mask(sample: TrainSample, segments: str, policy_version: int,
                 max_age: int = 1) -> list[bool] | None:
    """Which response tokens of a (partial-rollout) trajectory enter the loss: "all";
    "latest" (the last segment: the one the current policy θ_i generated); "recent" (the
    segments produced at most ``max_age`` policy versions before ``policy_version``).
    None: every token (a trajectory of one segment, or "all")."""
    if segments == "all" or sample.token_segments is None:
        return None
    if segments == "latest":
        last = sample.token_segments[-1] if sample.token_segments else 0
        return [seg == last for seg in sample.token_segments]
    if segments == "recent":
        versions = sample.token_versions or [sample.policy_version] * len(sample.token_segments)
        return [policy_version - v <= max_age for v in versions]
    raise ValueError(f"segments must be 'all', 'latest' or 'recent', got {segments!r}")


def split_groups(group_ids: Sequence[int], parts: int) -> list[list[int]]:
    """Sample indices of ``parts`` mini-batches of whole groups (near-equal group counts)."""
    members: dict[int, list[int]] = {}
    for i, group in enumerate(group_ids):
        members.setdefault(group, []).append(i)
    order = list(members)
    if parts > len(order):
        raise ValueError(f"minibatches={parts} but the batch has {len(order)} groups "
                         "(a mini-batch holds whole groups)")
    bounds = [round(p * len(order) / parts) for p in range(parts + 1)]
    return [sorted(i for g in order[a:b] for i in members[g]) for a, b in pairwise(bounds)]


def _group_rewards(samples: Sequence[TrainSample]) -> dict[int, set[float]]:
    rewards: dict[int, set[float]] = {}
    for s in samples:
        rewards.setdefault(s.group_id, set()).add(s.reward)
    return rewards


def uniform_group_fraction(samples: Sequence[TrainSample]) -> float:
    """Fraction of groups whose rewards are all equal (no policy gradient with mean baseline)."""
    rewards = _group_rewards(samples)
    return sum(len(r) == 1 for r in rewards.values()) / len(rewards)


def mixed_groups(samples: Sequence[TrainSample]) -> list[TrainSample]:
    """The samples of groups whose rewards are not all equal (the ones with a policy gradient)."""
    rewards = _group_rewards(samples)
    return [s for s in samples if len(rewards[s.group_id]) > 1]
