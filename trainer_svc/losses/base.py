"""What every RL loss sees, and the pieces policy-gradient losses share.

The RL step (:mod:`trainer_svc.rl_step`) splits an iteration's samples into mini-batches
of whole groups (one optimizer step each) and every mini-batch into micro-batches (one
forward/backward each; a sample's tokens always sit in one micro-batch). A loss is
called once per micro-batch and returns that micro-batch's share of the mini-batch
loss, so the shares' gradients add up to the gradient of the whole. Everything a share
needs from the rest of the mini-batch (rewards, group sizes, token counts) is in the
:class:`MiniBatch`, known before any forward pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor


class LossConfig(BaseModel):
    """Base of every loss's parameters; ``name`` selects the loss (``trainer.loss.name``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = Field(description="Registered loss name.")


@dataclass(frozen=True)
class MiniBatch:
    """Per-sample facts of one mini-batch (``[N]`` tensors, float64 unless said).

    ``group`` numbers the prompts 0..G-1; ``group_size`` is each sample's k; ``tokens``
    counts each sample's tokens in the loss; ``lengths`` its response length in tokens
    (all segments). ``current`` and ``ref_seq`` are the sequence log-probs under the
    weights about to step and under θ_i, filled only for losses that ask for them
    (:attr:`Loss.needs_current`).
    """

    rewards: Tensor
    group: Tensor
    group_size: Tensor
    tokens: Tensor
    lengths: Tensor
    current: Tensor | None = None
    ref_seq: Tensor | None = None

    @property
    def size(self) -> int:
        return self.rewards.numel()

    @property
    def num_groups(self) -> int:
        return int(self.group.max()) + 1

    @property
    def total_tokens(self) -> float:
        return float(self.tokens.sum())

    def group_mean(self, values: Tensor) -> Tensor:
        sums = torch.zeros(self.num_groups, dtype=values.dtype).index_add_(0, self.group, values)
        counts = torch.zeros(self.num_groups, dtype=values.dtype).index_add_(
            0, self.group, torch.ones_like(values))
        return (sums / counts)[self.group]

    def group_std(self, values: Tensor) -> Tensor:
        """Unbiased standard deviation within each sample's group (0 for k = 1)."""
        centred = values - self.group_mean(values)
        sq = torch.zeros(self.num_groups, dtype=values.dtype).index_add_(
            0, self.group, centred.square())[self.group]
        return torch.where(self.group_size > 1, sq / (self.group_size - 1).clamp(min=1), 0.0).sqrt()


@dataclass(frozen=True)
class Tokens:
    """The loss tokens of one micro-batch, flat (``[T]``): ``sample`` indexes the
    :class:`MiniBatch`; ``logprobs`` is differentiable (current θ); ``ref`` is θ_i's and
    ``rollout`` the rollout engine's log-prob of the same token (both constants);
    ``weight`` the train/inference mismatch correction (1 where off)."""

    sample: Tensor
    logprobs: Tensor
    ref: Tensor
    rollout: Tensor
    weight: Tensor
    size: int

    def per_sample(self, values: Tensor) -> Tensor:
        """Sum of ``values`` over each sample's tokens: ``[N]`` (0 for absent samples)."""
        out = torch.zeros(self.size, dtype=values.dtype, device=values.device)
        return out.index_add(0, self.sample, values)

    @property
    def present(self) -> Tensor:
        """``[N]`` bool: the samples whose tokens are in this micro-batch."""
        out = torch.zeros(self.size, dtype=torch.bool, device=self.sample.device)
        out[self.sample] = True
        return out

    @property
    def log_ratio(self) -> Tensor:
        """log πθ − log πθi per token (differentiable)."""
        return self.logprobs - self.ref


class Loss(ABC):
    """An RL objective to minimise. Subclasses set ``Config`` and register with
    ``@LOSSES.register(name)`` (k1rl.registry); ``__call__`` returns one micro-batch's
    share of the mini-batch loss (see the module docstring)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[LossConfig]] = LossConfig
    # True: the step fills MiniBatch.current / ref_seq (a no-grad forward pass before
    # every optimizer step): for losses coupling samples non-linearly, e.g. pairs.
    needs_current: ClassVar[bool] = False

    def __init__(self, cfg: LossConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def __call__(self, tokens: Tokens, batch: MiniBatch) -> Tensor: ...

    def metrics(self, log_ratio_sq: float) -> dict[str, float]:
        """Loss-specific metrics of an iteration, from the mean squared log-ratio."""
        return {}

    def token_weights(self, ref: Tensor, rollout: Tensor, sample: Tensor, size: int) -> Tensor:
        """Per-token weight of the train/inference mismatch correction (none: all 1)."""
        return torch.ones_like(ref)


# ----------------------------------------------------- train/inference mismatch correction


class MismatchCorrection(BaseModel):
    """Truncated or masked importance sampling (TIS / MIS) over πθi / π_rollout.

    The rollout engine's log-probs differ from the trainer's for the same weights (other
    kernels, bf16, a stale segment of a partial rollout). Each token's policy-gradient
    term is weighted by w = πθi(y_t) / π_rollout(y_t) (``level: token``) or by the
    sequence's product of them (``level: sequence``): ``tis`` caps w at ``cap``, ``mis``
    drops the token (w = 0) when w is outside [``lower``, ``cap``].
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    mode: Literal["none", "tis", "mis"] = Field("none", description="none | tis | mis.")
    level: Literal["token", "sequence"] = Field("token", description="Ratio per token or "
                                                "per sequence (product of token ratios).")
    cap: float = Field(2.0, gt=1, description="Largest weight kept (tis) or allowed (mis).")
    lower: float = Field(0.0, ge=0, lt=1, description="mis: smallest weight allowed.")

    @model_validator(mode="after")
    def _lower_only_for_mis(self) -> MismatchCorrection:
        if self.lower and self.mode != "mis":
            raise ValueError("lower applies to mode 'mis' only")
        return self


def mismatch_weights(ref: Tensor, rollout: Tensor, sample: Tensor, size: int,
                     cfg: MismatchCorrection) -> Tensor:
    """Per-token weights (constants) of the correction ``cfg`` (see MismatchCorrection)."""
    if cfg.mode == "none":
        return torch.ones_like(ref)
    log_w = (ref - rollout).detach().double()
    if cfg.level == "sequence":
        seq = torch.zeros(size, dtype=log_w.dtype, device=log_w.device).index_add(0, sample, log_w)
        log_w = seq[sample]
    w = log_w.clamp(max=80.0).exp()
    if cfg.mode == "tis":
        w = w.clamp(max=cfg.cap)
    else:
        w = torch.where((w >= cfg.lower) & (w <= cfg.cap), w, 0.0)
    return w.to(ref.dtype)


class PolicyGradientConfig(LossConfig):
    """Parameters every policy-gradient loss has."""

    mismatch: MismatchCorrection = Field(
        default_factory=MismatchCorrection,
        description="Train/inference mismatch correction (TIS/MIS) of the policy-gradient "
        "term; none by default (fp32 engines agree to ~1e-3 here), recommended for bf16.")


class PolicyGradientLoss(Loss):
    """A loss whose config is a PolicyGradientConfig: it applies the mismatch correction."""

    def token_weights(self, ref: Tensor, rollout: Tensor, sample: Tensor, size: int) -> Tensor:
        return mismatch_weights(ref, rollout, sample, size, self.cfg.mismatch)


# ------------------------------------------------------------------- shared pieces


def group_advantages(batch: MiniBatch, scale: str, eps: float = 1e-6) -> Tensor:
    """Rewards minus the group's mean, divided by the group's (``group``) or the mini-batch's
    (``batch``) standard deviation, or not scaled (``none``); ``[N]`` float64."""
    centred = batch.rewards - batch.group_mean(batch.rewards)
    if scale == "group":
        return centred / (batch.group_std(batch.rewards) + eps)
    if scale == "batch":
        return centred / (batch.rewards.std() + eps if batch.size > 1 else 1.0)
    return centred


def aggregate(per_token: Tensor, tokens: Tokens, batch: MiniBatch, how: str,
              max_tokens: float = 1.0) -> Tensor:
    """This micro-batch's share of the mini-batch loss from per-token terms:
    ``token_mean`` = Σ terms / all loss tokens of the mini-batch (DAPO);
    ``sequence_mean`` = mean over samples of each sample's token mean (GRPO);
    ``sequence_sum`` = mean over samples of each sample's token sum / ``max_tokens``
    (Dr. GRPO's constant normaliser)."""
    if how == "token_mean":
        return per_token.sum() / batch.total_tokens
    per_sample = tokens.per_sample(per_token)
    if how == "sequence_mean":
        counts = batch.tokens.to(per_token.device, per_token.dtype).clamp(min=1)
        return (per_sample / counts).sum() / batch.size
    if how == "sequence_sum":
        return per_sample.sum() / (batch.size * max_tokens)
    raise ValueError(f"unknown aggregation {how!r}")


def prompt_mean(per_sample: Tensor, tokens: Tokens, batch: MiniBatch) -> Tensor:
    """Σ_g 1/(G k_g) Σ_{j in g} x_j over this micro-batch's samples: every prompt weighs the
    same whatever its k (k1.5's 1/k per prompt, a mean over prompts)."""
    weight = 1.0 / (batch.num_groups * batch.group_size)
    weight = weight.to(per_sample.device, per_sample.dtype)
    return torch.where(tokens.present, weight * per_sample, 0.0).sum()
