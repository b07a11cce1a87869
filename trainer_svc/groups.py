"""An iteration's samples as groups: validation, segment selection, mini-batches of whole
groups (a group's baseline needs all its k rewards), and the groups that carry a gradient."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

from k1rl.protocol import TrainBatch, TrainSample

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
