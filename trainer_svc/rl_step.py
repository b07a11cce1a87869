"""One RL iteration on the trainer, generic over the loss (:mod:`trainer_svc.losses`).

It owns what every loss shares:

- the optimizer policy: k1.5 resets the optimizer every iteration (``reset``); ``keep``
  carries Adam's moments across iterations; ``reset_first_moment`` zeroes the momentum
  and keeps the per-parameter scale;
- mini-batches of whole groups (one optimizer step each) and epochs over them;
- the reference θ_i's token log-probs: the step's own forward pass when the iteration is
  one step (θ = θ_i throughout it), else a no-grad pass before any weight moves, or the
  rollout engine's log-probs (``reference: rollout``, no extra pass);
- the rollout log-probs, laid out token by token beside the trainer's, for the mismatch
  correction a loss applies (TIS/MIS) and for the mismatch alarm: the mean and max
  |rollout − trainer| log-prob at θ_i over tokens that θ_i itself generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from k1rl.protocol import TrainBatch, TrainSample
from trainer_svc.groups import (
    as_train_samples,
    mixed_groups,
    segment_mask,
    split_groups,
    uniform_group_fraction,
)
from trainer_svc.losses.base import Loss, MiniBatch, Tokens
from trainer_svc.model import TokenBatch

if TYPE_CHECKING:
    from k1rl.config import TrainerConfig
    from trainer_svc.trainer import MegatronTrainer

OptimizerPolicy = Literal["reset", "keep", "reset_first_moment"]


@dataclass(frozen=True)
class StepSettings:
    """How an iteration trains (the trainer config's fields of the same meaning)."""

    optimizer: OptimizerPolicy = "reset"
    minibatches: int = 1
    epochs: int = 1
    skip_uniform_groups: bool = False
    segments: str = "all"
    max_segment_age: int = 1
    reference: Literal["trainer", "rollout"] = "trainer"

    def __post_init__(self) -> None:
        if self.minibatches < 1 or self.epochs < 1:
            raise ValueError(f"minibatches={self.minibatches} and epochs={self.epochs} "
                             "must be >= 1")

    @classmethod
    def from_config(cls, t: TrainerConfig) -> StepSettings:
        return cls(optimizer=t.optimizer_policy, minibatches=t.minibatches_per_iteration,
                   epochs=t.epochs_per_iteration, skip_uniform_groups=t.skip_uniform_groups,
                   segments=t.segments, max_segment_age=t.max_segment_age,
                   reference=t.reference)


@dataclass
class _Part:
    """One mini-batch: its samples and, per micro-batch, flat token tensors in the order
    of ``sample_index >= 0`` (row-major): rollout log-probs, whether θ_i generated the
    token, and θ_i's log-probs (None until known)."""

    samples: list[TrainSample]
    batch: MiniBatch
    micro: list[TokenBatch]
    rollout: list[Tensor]
    own: list[Tensor]
    ref: list[Tensor] | None = None
    seen: list[Tensor] = field(default_factory=list)


def rl_iteration(trainer: MegatronTrainer, samples: TrainBatch | Sequence[TrainSample | tuple],
                 loss: Loss, settings: StepSettings = StepSettings()) -> dict[str, float]:
    """``settings.minibatches * settings.epochs`` optimizer steps of ``loss`` on ``samples``
    (one mini-batch per group when the batch has fewer groups than mini-batches).

    ``samples``: a TrainBatch, TrainSamples, or tuples ``(group_id, prompt_token_ids,
    response_token_ids, rollout_logprobs, reward[, policy_version])``; the k samples of a
    prompt share a group id. Partial-rollout trajectories enter the loss with the tokens
    :func:`~trainer_svc.groups.segment_mask` selects. Returns step means and last values
    (``loss``, ``grad_norm``), ``reward_mean``, ``uniform_groups``, ``trained_samples``,
    the mismatch alarm (``rollout_logprob_diff[_max]``, ``stale_samples``),
    ``log_ratio_sq`` (mean squared sequence log-ratio to θ_i over steps),
    ``ref_gap_first_step`` (max |log ratio| at the first step: ~0 unless the reference is
    wrong), ``mismatch_weight_mean`` and the loss's own metrics.
    """
    version = trainer.policy_version
    samples = as_train_samples(samples, version)
    received = samples
    if settings.skip_uniform_groups:
        samples = mixed_groups(received) or received
    trainer.prepare_optimizer(settings.optimizer)
    groups = [s.group_id for s in samples]
    # an iteration may bring fewer groups than mini-batches (skip_uniform_groups leaves out
    # the all-right and all-wrong ones): then one step per group, never a failed iteration
    minibatches = min(settings.minibatches, len(set(groups)))
    parts = [_plan(trainer, [samples[i] for i in idx], settings, version)
             for idx in split_groups(groups, minibatches)]
    own_forward = (minibatches * settings.epochs == 1
                   and settings.reference == "trainer" and not loss.needs_current)
    diffs: list[Tensor] = []
    for part in parts if not own_forward else ():
        if settings.reference == "trainer":
            part.ref = _token_logprobs(trainer, part.micro)
            diffs += _alarm(part.ref, part)
        else:
            part.ref = part.rollout
    steps, ratios, weights = [], [], []
    for _ in range(settings.epochs):
        for part in parts:
            if loss.needs_current:
                part.batch = _with_current(trainer, part)
            part.seen = []
            steps.append(trainer.train_step(_loss_fn(loss, part), part.micro,
                                            on_record=_recorder(part, ratios, weights)))
            if not diffs and len(steps) == 1:  # the first step's forward pass is θ_i's
                diffs += _alarm(part.seen, part)
    return {**_step_metrics(trainer, steps, ratios, weights, diffs, loss),
            **_batch_metrics(received, samples, parts, version)}


def _step_metrics(trainer: MegatronTrainer, steps: list[dict], ratios: list[Tensor],
                  weights: list[Tensor], diffs: list[Tensor], loss: Loss) -> dict[str, float]:
    diff = torch.cat(diffs) if diffs else torch.zeros(1)
    if not diff.numel():  # no token of this policy's own (every one was older)
        diff = torch.zeros(1)
    log_ratio_sq = torch.cat(ratios).square().mean().item()
    return {
        "steps": float(len(steps)),
        "loss": sum(s["loss"] for s in steps) / len(steps),
        "loss_last": steps[-1]["loss"],
        "grad_norm": sum(s["grad_norm"] for s in steps) / len(steps),
        "grad_norm_last": steps[-1]["grad_norm"],
        "lr": trainer.optim.lr,
        "policy_version": float(trainer.policy_version),
        "rollout_logprob_diff": diff.mean().item(),
        "rollout_logprob_diff_max": diff.max().item(),
        "log_ratio_sq": log_ratio_sq,
        "ref_gap_first_step": ratios[0].abs().max().item() if ratios[0].numel() else 0.0,
        "mismatch_weight_mean": torch.cat(weights).mean().item(),
        **loss.metrics(log_ratio_sq),
    }


def _batch_metrics(received: list[TrainSample], trained: list[TrainSample], parts: list[_Part],
                   version: int) -> dict[str, float]:
    return {
        "samples": float(len(received)),
        "reward_mean": sum(s.reward for s in received) / len(received),
        "uniform_groups": uniform_group_fraction(received),
        "trained_samples": float(len(trained)),
        "response_tokens": float(sum(p.batch.total_tokens for p in parts)),
        "stale_samples": float(sum(s.policy_version != version for s in received)),
    }


def _plan(trainer: MegatronTrainer, part: list[TrainSample], settings: StepSettings,
          version: int) -> _Part:
    masks = [segment_mask(s, settings.segments, version, settings.max_segment_age)
             for s in part]
    micro = trainer.micro_batches([s.prompt_token_ids for s in part],
                                  [s.response_token_ids for s in part], pack=True, masks=masks)
    kept = [[True] * len(s.response_token_ids) if m is None else list(m)
            for s, m in zip(part, masks, strict=True)]
    rollout = [torch.tensor([lp for lp, k in zip(s.rollout_logprobs, keep) if k])
               for s, keep in zip(part, kept, strict=True)]
    own = [torch.tensor([v == version for v, k in zip(s.token_versions, keep) if k]
                        if s.token_versions else [True] * sum(keep), dtype=torch.bool)
           for s, keep in zip(part, kept, strict=True)]
    ids = torch.tensor([s.group_id for s in part])
    group = torch.unique(ids, return_inverse=True)[1]
    sizes = torch.bincount(group).double()
    batch = MiniBatch(
        rewards=torch.tensor([s.reward for s in part], dtype=torch.float64),
        group=group, group_size=sizes[group],
        tokens=torch.tensor([float(sum(k)) for k in kept], dtype=torch.float64),
        lengths=torch.tensor([float(len(s.response_token_ids)) for s in part],
                             dtype=torch.float64),
    )
    device = trainer.device
    return _Part(part, batch, micro,
                 rollout=[_lay_out(b, rollout).to(device) for b in micro],
                 own=[_lay_out(b, own).to(device) for b in micro])


def _lay_out(batch: TokenBatch, per_sample: Sequence[Tensor]) -> Tensor:
    """Per-sample token values (each sample's loss tokens in order) in the micro-batch's
    flat token order: row-major, so each sample's tokens are in order and a stable sort
    by sample groups them."""
    index = batch.sample_index[batch.sample_index >= 0].cpu()
    values = torch.cat([per_sample[i] for i in index.unique(sorted=True).tolist()])
    if values.numel() != index.numel():
        raise RuntimeError(f"{values.numel()} token values for {index.numel()} loss tokens")
    out = torch.empty_like(values)
    out[torch.sort(index, stable=True).indices] = values
    return out


def _token_logprobs(trainer: MegatronTrainer, micro: Sequence[TokenBatch]) -> list[Tensor]:
    return [t.to(trainer.device) for t in trainer.token_logprobs(micro)]


def _with_current(trainer: MegatronTrainer, part: _Part) -> MiniBatch:
    """The mini-batch with every sample's sequence log-prob now and under θ_i."""
    n = part.batch.size
    current = torch.zeros(n, dtype=torch.float64)
    ref = torch.zeros(n, dtype=torch.float64)
    for batch, now, then in zip(part.micro, _token_logprobs(trainer, part.micro), part.ref,
                                strict=True):
        index = batch.sample_index[batch.sample_index >= 0].cpu()
        current.index_add_(0, index, now.double().cpu())
        ref.index_add_(0, index, then.double().cpu())
    return replace(part.batch, current=current, ref_seq=ref)


def _loss_fn(loss: Loss, part: _Part):
    """The train_step loss of one mini-batch: builds each micro-batch's Tokens (with the
    reference from ``part.ref``, or this forward pass's own values when it is None) and
    returns, besides the loss, the token log-probs it saw, the sequence log-ratios and the
    mismatch weights (it runs on the last pipeline stage: :func:`_recorder` keeps them on
    every rank)."""
    where = {id(b): k for k, b in enumerate(part.micro)}

    def loss_fn(logprobs: Tensor, batch: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        k = where[id(batch)]
        mask = batch.sample_index >= 0
        index, values = batch.sample_index[mask], logprobs[mask]
        ref = values.detach() if part.ref is None else part.ref[k].to(values.dtype)
        rollout = part.rollout[k].to(values.dtype)
        weight = loss.token_weights(ref, rollout, index, part.batch.size)
        tokens = Tokens(sample=index, logprobs=values, ref=ref, rollout=rollout,
                        weight=weight, size=part.batch.size)
        ratio = (tokens.per_sample(values.detach()) - tokens.per_sample(ref))[tokens.present]
        record = {"seen": values.detach().cpu(), "ratio": ratio.cpu(),
                  "weight": weight.double().cpu()}
        return loss(tokens, part.batch), record

    return loss_fn


def _recorder(part: _Part, ratios: list[Tensor], weights: list[Tensor]):
    def keep(_k: int, record: dict[str, Tensor]) -> None:
        part.seen.append(record["seen"])
        ratios.append(record["ratio"])
        weights.append(record["weight"])

    return keep


def _alarm(trainer_tokens: Sequence[Tensor], part: _Part) -> list[Tensor]:
    """|rollout − trainer| per token, over the tokens θ_i generated (older segments of a
    partial rollout differ by design)."""
    return [(t.to(r.device) - r.to(t.dtype)).abs()[own]
            for t, r, own in zip(trainer_tokens, part.rollout, part.own, strict=True)]
