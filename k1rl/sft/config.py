"""The ``sft`` section of a run config: what `k1rl sft` trains on and its schedule.

k1.5 trains in stages (§2.5: vanilla SFT, long-CoT SFT, then continued training at 32k and
128k with the learning rate warmed up again): a schedule here is a list of stages, each
with its own length (steps or epochs), learning-rate curve and packed row length.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from k1rl.data.sources import DataConfig, DataSource
from k1rl.yaml_config import Section


class SFTStage(Section):
    """One stage: linear warm-up to ``lr``, then ``decay`` to ``min_lr_fraction`` x ``lr``
    at the stage's last step."""

    steps: int | None = Field(None, ge=1, description="Optimizer steps (or give epochs).")
    epochs: float | None = Field(None, gt=0, description="Passes over the training rows "
                                 "(steps = ceil(epochs x rows / sft.batch)).")
    lr: float = Field(gt=0, allow_inf_nan=False, description="Peak learning rate.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warm-up from ~0.")
    decay: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate curve after the warm-up.")
    min_lr_fraction: float = Field(0.1, ge=0, le=1, description="Final lr / peak lr.")
    seq_length: int | None = Field(None, ge=2, description="Packed row length in this stage "
                                   "(tokens); null: trainer.seq_length.")

    @model_validator(mode="after")
    def _one_length(self) -> SFTStage:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps or epochs")
        return self

    def total_steps(self, rows: int, batch: int) -> int:
        return self.steps or max(1, math.ceil(self.epochs * rows / batch))

    def lr_at(self, step: int, total: int) -> float:
        """The learning rate of step ``step`` (0-based) of a stage ``total`` steps long."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - 1 - self.warmup_steps))
        shape = (0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine"
                 else 1.0 - progress)
        return self.lr * (self.min_lr_fraction + (1 - self.min_lr_fraction) * shape)


class SFTStop(Section):
    """Stop SFT early once the policy solves enough of some problems: every ``every``
    steps from ``min_steps`` on, the trainer's weights go to a rollout engine, which
    samples each problem ``samples`` times at the rollout temperature; reward_svc judges.

    For RL that follows: what a policy has learned shows in what it samples long before
    the loss says so (a tiny model learns to copy operands in a sudden transition whose
    step varies by seed), and RL needs a start that solves some but not all of its
    prompts. The stages' schedules still span all their steps."""

    accuracy: float = Field(gt=0, le=1, description="Stop once sampled pass@1 reaches this.")
    data: list[DataSource] = Field(min_length=1, description="Problems with an answer or "
                                   "tests (each source one level of the reported accuracy).")
    problems_per_source: int | None = Field(None, ge=1, description="At most this many rows "
                                            "of each source, the first ones.")
    every: int = Field(20, ge=1, description="Steps between measurements.")
    min_steps: int = Field(0, ge=0, description="No measurement before this step.")
    samples: int = Field(4, ge=1, description="Samples per problem.")

    def due(self, steps_done: int) -> bool:
        return steps_done >= self.min_steps and steps_done % self.every == 0


class SFTConfig(Section):
    """Supervised fine-tuning (`k1rl sft`): rows with a response, or chat messages ending
    in an assistant turn, from ``data``; AdamW on packed rows."""

    data: DataConfig = Field(default_factory=DataConfig, description="SFT rows (train) and "
                             "validation rows (eval, or a hash split of train).")
    loss_on: Literal["assistant", "all"] = Field(
        "assistant", description="assistant: loss on the response / every assistant turn "
        "(multi-turn), none on prompts, system or user turns; all: on every token "
        "(continued pre-training, e.g. k1.5's cooldown and long-context stages).")
    batch: int = Field(64, ge=1, description="Examples per optimizer step.")
    eval_every: int = Field(0, ge=0, description="Steps between validation losses "
                            "(0: only after the last step; needs held-out rows).")
    eval_examples: int = Field(256, ge=1, description="Held-out rows the validation loss "
                               "is measured on.")
    stages: list[SFTStage] = Field(default_factory=list, description="The schedule, in "
                                   "order; `k1rl sft` needs at least one stage.")
    stop_when: SFTStop | None = Field(None, description="Early stop on sampled accuracy "
                                      "(starts the rollout, reward and sidecar services).")
