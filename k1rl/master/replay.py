"""k1.5 partial rollouts: the replay buffer of trajectories that outlive an iteration.

Every iteration a trajectory may generate at most ``rollout.max_tokens`` new tokens (a
segment). One that uses them all before its end (EOS, a repetition stop, or
``rollout.max_response_tokens`` in all) is parked here with its prompt and every
segment so far (tokens, the log-probs and policy version that produced them), and the
next iteration continues it, first, beside fresh prompts. A group of k samples of one
prompt is handed to reward and training once all k have finished: the mirror-descent
baseline needs all k rewards.

The buffer is bounded by ``rollout.replay_capacity`` unfinished trajectories (fresh
prompts are admitted only while there is room) and saved in the run directory with
every checkpoint, one file per iteration that the run state names, so a resumed run goes
on with exactly the trajectories it had parked after its last completed iteration.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from k1rl.data.problem import Problem
from k1rl.protocol import Completion, Continuation, FinishReason, TrainSample


class Segment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token_ids: list[int]
    text: str
    logprobs: list[float]
    policy_version: int
    iteration: int


class Trajectory(BaseModel):
    model_config = ConfigDict(extra="forbid")

    segments: list[Segment] = Field(default_factory=list)
    finish_reason: FinishReason | None = None  # None: parked, to be continued

    @property
    def token_ids(self) -> list[int]:
        return [t for s in self.segments for t in s.token_ids]

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)


class Group(BaseModel):
    """The k trajectories of one prompt, started in iteration ``started``."""

    model_config = ConfigDict(extra="forbid")

    key: str
    task: Problem
    prompt_token_ids: list[int]
    started: int
    trajectories: list[Trajectory]

    @property
    def done(self) -> bool:
        return all(t.finish_reason is not None for t in self.trajectories)

    def train_samples(self, group_id: int, rewards: list[float]) -> list[TrainSample]:
        """Whole trajectories with each token's segment and policy version."""
        samples = []
        for trajectory, reward in zip(self.trajectories, rewards, strict=True):
            segs = trajectory.segments
            samples.append(TrainSample(
                group_id=group_id,
                prompt_token_ids=self.prompt_token_ids,
                response_token_ids=trajectory.token_ids,
                rollout_logprobs=[lp for s in segs for lp in s.logprobs],
                reward=reward,
                policy_version=segs[-1].policy_version,
                token_segments=[i for i, s in enumerate(segs) for _ in s.token_ids],
                token_versions=[s.policy_version for s in segs for _ in s.token_ids],
            ))
        return samples


class ReplayBuffer:
    def __init__(self, capacity: int, segment_tokens: int, max_response_tokens: int,
                 partial: bool = True) -> None:
        """``partial`` False: every trajectory ends with its first segment, whatever stopped
        it (a budget cut by rl.schedule included)."""
        if not 0 < segment_tokens <= max_response_tokens:
            raise ValueError(f"need 0 < segment_tokens ({segment_tokens}) <= "
                             f"max_response_tokens ({max_response_tokens})")
        self.capacity = capacity
        self.segment_tokens = segment_tokens
        self.max_response_tokens = max_response_tokens
        self.partial = partial
        self.groups: list[Group] = []

    # --------------------------------------------------------------- what to run
    def parked(self) -> list[tuple[Group, Trajectory]]:
        """Unfinished trajectories, oldest group first (they are continued first)."""
        return [(g, t) for g in self.groups for t in g.trajectories if t.finish_reason is None]

    def room(self) -> int:
        """How many more unfinished trajectories the buffer may hold."""
        return max(self.capacity - len(self.parked()), 0)

    def continuations(self) -> list[Continuation]:
        """One more segment of every parked trajectory (same order as :meth:`parked`)."""
        return [Continuation(prompt_token_ids=g.prompt_token_ids,
                             generated_token_ids=t.token_ids,
                             max_tokens=min(self.segment_tokens,
                                            self.max_response_tokens - len(t.token_ids)))
                for g, t in self.parked()]

    # ------------------------------------------------------------- what came back
    def start(self, key: str, task: Problem, prompt_token_ids: list[int],
              completions: list[Completion], iteration: int) -> Group:
        group = Group(key=key, task=task, prompt_token_ids=prompt_token_ids,
                      started=iteration, trajectories=[Trajectory() for _ in completions])
        for trajectory, completion in zip(group.trajectories, completions):
            self._add(trajectory, completion, iteration)
        self.groups.append(group)
        return group

    def extend(self, parked: list[tuple[Group, Trajectory]], completions: list[Completion],
               iteration: int) -> None:
        """Record the new segment of each trajectory :meth:`continuations` listed."""
        for (_, trajectory), completion in zip(parked, completions, strict=True):
            self._add(trajectory, completion, iteration)

    def _add(self, trajectory: Trajectory, c: Completion, iteration: int) -> None:
        trajectory.segments.append(Segment(token_ids=c.token_ids, text=c.text,
                                           logprobs=c.logprobs,
                                           policy_version=c.policy_version,
                                           iteration=iteration))
        may_grow = (self.partial and c.finish_reason == "length"
                    and len(trajectory.token_ids) < self.max_response_tokens)
        if not may_grow:
            trajectory.finish_reason = c.finish_reason

    def pop_done(self) -> list[Group]:
        """Remove and return the groups whose every trajectory has finished."""
        done = [g for g in self.groups if g.done]
        self.groups = [g for g in self.groups if not g.done]
        return done

    # ------------------------------------------------------------------- metrics
    def metrics(self, iteration: int) -> dict[str, float]:
        parked = self.parked()
        ages = [iteration - g.started for g, _ in parked]
        return {
            "replay_parked": float(len(parked)),
            "replay_groups": float(len(self.groups)),
            "replay_age_mean": sum(ages) / len(ages) if ages else 0.0,
            "replay_age_max": float(max(ages, default=0)),
            "replay_parked_tokens": float(sum(len(t.token_ids) for _, t in parked)),
        }

    # ----------------------------------------------------------------- persistence
    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([g.model_dump(mode="json") for g in self.groups]))
        os.replace(tmp, path)  # atomic: a kill leaves no half-written buffer

    def load(self, path: Path | None) -> None:
        """The buffer saved at ``path`` (None: an empty buffer, a run's start)."""
        if path is None:
            self.groups = []
            return
        self.groups = [Group.model_validate(g) for g in json.loads(Path(path).read_text())]
