"""Partial rollouts: trajectories parked at the token budget, continued, assembled exactly."""

from __future__ import annotations

import pytest

from k1rl.data.tasks import generate_tasks
from k1rl.master.replay import ReplayBuffer
from k1rl.protocol import Completion

TASK = generate_tasks("add", 2, 1, seed=0)[0]
PROMPT = [11, 12, 13]


def c(tokens: list[int], finish: str, version: int) -> Completion:
    return Completion(token_ids=tokens, text="".join(f"<{t}>" for t in tokens),
                      logprobs=[-t / 100 for t in tokens], finish_reason=finish,
                      policy_version=version)


def test_a_group_assembled_over_three_iterations_is_exact():
    buf = ReplayBuffer(capacity=10, segment_tokens=3, max_response_tokens=8)
    # iteration 0 (policy v5): sample a ends at once, b and c use their 3-token budget
    buf.start("0-0", TASK, PROMPT, [c([1, 2], "stop", 5), c([3, 4, 5], "length", 5),
                                    c([6, 7, 8], "length", 5)], iteration=0)
    assert buf.pop_done() == []
    conts = buf.continuations()
    assert [(x.generated_token_ids, x.max_tokens) for x in conts] == [([3, 4, 5], 3),
                                                                     ([6, 7, 8], 3)]
    assert all(x.prompt_token_ids == PROMPT for x in conts)
    # iteration 1 (v6): b stops, c goes on; only 2 tokens left for c then
    buf.extend(buf.parked(), [c([9], "stop", 6), c([10, 11, 12], "length", 6)], iteration=1)
    assert [x.max_tokens for x in buf.continuations()] == [2]
    assert buf.metrics(1)["replay_parked"] == 1 and buf.metrics(1)["replay_age_max"] == 1
    # iteration 2 (v7): c reaches max_response_tokens: finished by length
    buf.extend(buf.parked(), [c([13, 14], "length", 7)], iteration=2)
    (group,) = buf.pop_done()
    assert buf.groups == [] and buf.parked() == []
    assert [t.finish_reason for t in group.trajectories] == ["stop", "stop", "length"]

    a, b, cc = group.train_samples(group_id=4, rewards=[1.0, 0.0, 0.0])
    assert a.response_token_ids == [1, 2] and a.token_segments == [0, 0]
    assert a.token_versions == [5, 5] and a.policy_version == 5
    assert b.response_token_ids == [3, 4, 5, 9]
    assert b.token_segments == [0, 0, 0, 1] and b.token_versions == [5, 5, 5, 6]
    assert cc.response_token_ids == [6, 7, 8, 10, 11, 12, 13, 14]
    assert cc.token_segments == [0, 0, 0, 1, 1, 1, 2, 2]
    assert cc.token_versions == [5, 5, 5, 6, 6, 6, 7, 7]
    assert cc.rollout_logprobs == [-t / 100 for t in cc.response_token_ids]
    assert group.trajectories[2].text == "".join(f"<{t}>" for t in cc.response_token_ids)
    assert {s.group_id for s in (a, b, cc)} == {4} and a.prompt_token_ids == PROMPT


def test_fresh_prompts_are_admitted_only_while_there_is_room():
    buf = ReplayBuffer(capacity=4, segment_tokens=2, max_response_tokens=10)
    assert buf.room() == 4
    buf.start("0-0", TASK, PROMPT, [c([1, 2], "length", 0)] * 3, iteration=0)
    assert buf.room() == 1


def test_resume_keeps_the_parked_trajectories(tmp_path):
    buf = ReplayBuffer(capacity=10, segment_tokens=2, max_response_tokens=10)
    buf.start("3-1", TASK, PROMPT, [c([1, 2], "length", 3), c([5], "stop", 3)], iteration=3)
    buf.save(tmp_path / "replay" / "iter_00003.json")
    resumed = ReplayBuffer(capacity=10, segment_tokens=2, max_response_tokens=10)
    resumed.load(tmp_path / "replay" / "iter_00003.json")
    assert [g.model_dump() for g in resumed.groups] == [g.model_dump() for g in buf.groups]
    assert resumed.continuations() == buf.continuations()
    resumed.load(None)  # a run that never saved one
    assert resumed.groups == []


def test_the_budget_must_fit_the_response_limit():
    with pytest.raises(ValueError, match="segment_tokens"):
        ReplayBuffer(capacity=1, segment_tokens=9, max_response_tokens=8)
