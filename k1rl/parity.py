"""Do the trainer and the rollout engine give the same log-probs to the same tokens?

The costliest silent failure of an RL system: the engine samples from one model while the
trainer computes gradients of another (a conversion slip, a tied or untied head, a RoPE
variant, a dropped bias, a dtype). It shows as a gap between the log-probs the engine
reported while sampling and the trainer's log-probs of the same tokens. `k1rl doctor`
measures it on its own and `k1rl rl` before its first iteration trains; both use the
per-dtype tolerances below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from k1rl.config import RunConfig
from k1rl.protocol import LogprobRequest, LogprobResult


@dataclass(frozen=True)
class Tolerance:
    mean: float  # mean |difference| per token
    max: float   # largest |difference| of any token


# float32 on both sides agrees to ~1e-6 per token here (tests/test_e2e_weight_sync.py); the
# margin is for other kernels and longer sequences, far below what a slip gives (>> 1e-2).
DEFAULT_TOLERANCE = {
    "float32": Tolerance(mean=1e-4, max=1e-3),
    "bfloat16": Tolerance(mean=2e-2, max=1.0),
}


def tolerance(cfg: RunConfig) -> Tolerance:
    """The run's thresholds: parity.* where set, else the model dtype's defaults."""
    default = DEFAULT_TOLERANCE[cfg.model.dtype]
    return Tolerance(mean=cfg.parity.mean_abs_diff or default.mean,
                     max=cfg.parity.max_abs_diff or default.max)


class ParityError(RuntimeError):
    """The trainer and the engine disagree on log-probs beyond the tolerance."""


@dataclass(frozen=True)
class Parity:
    mean_abs_diff: float
    max_abs_diff: float
    tokens: int
    sequences: int

    def within(self, tol: Tolerance) -> bool:
        return self.mean_abs_diff <= tol.mean and self.max_abs_diff <= tol.max

    def describe(self, tol: Tolerance) -> str:
        return (f"mean |Δ log-prob| {self.mean_abs_diff:.2e} (tolerance {tol.mean:.0e}), max "
                f"{self.max_abs_diff:.2e} (tolerance {tol.max:.0e}) over {self.tokens} tokens "
                f"of {self.sequences} sequences")


def compare(engine: Sequence[Sequence[float]], trainer: Sequence[Sequence[float]]) -> Parity:
    """Per-token agreement of two sets of log-probs of the same sequences."""
    if len(engine) != len(trainer):
        raise ValueError(f"{len(engine)} engine sequences but {len(trainer)} trainer ones")
    diffs = []
    for i, (ours, theirs) in enumerate(zip(engine, trainer)):
        if len(ours) != len(theirs):
            raise ValueError(f"sequence {i}: {len(ours)} engine log-probs, {len(theirs)} "
                             "trainer ones")
        diffs += [abs(a - b) for a, b in zip(ours, theirs)]
    if not diffs:
        raise ValueError("no tokens to compare")
    return Parity(mean_abs_diff=sum(diffs) / len(diffs), max_abs_diff=max(diffs),
                  tokens=len(diffs), sequences=len(engine))


def against_trainer(trainer, prompts: Sequence[Sequence[int]],
                    responses: Sequence[Sequence[int]],
                    engine_logprobs: Sequence[Sequence[float]]) -> Parity:
    """Score the sequences with the trainer (an RPCClient) and compare with the engine's."""
    result = trainer.call("logprobs", LogprobRequest(
        prompt_token_ids=[list(p) for p in prompts],
        response_token_ids=[list(r) for r in responses]), LogprobResult)
    return compare(engine_logprobs, result.logprobs)
