"""Prompt sampling: uniform, curriculum schedules, prioritized by 1 - success rate."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from k1rl.data.tasks import generate_tasks
from k1rl.master.samplers import PromptSampler, create
from k1rl.rl_config import RLConfig

POOLS = [generate_tasks("add", 1, 40, seed=0), generate_tasks("add", 2, 40, seed=0),
         generate_tasks("add", 3, 40, seed=0)]


def sampler(**cfg) -> PromptSampler:
    return create(RLConfig(tasks=["add:1", "add:2", "add:3"], **cfg), POOLS)


def test_uniform_draws_what_the_loop_always_drew():
    s = sampler(prompts_per_iteration=8)
    union = [t for p in POOLS for t in p]
    assert s.sample(random.Random(3), 0) == random.Random(3).sample(union, 8)


def test_easy_to_hard_opens_one_difficulty_at_a_time():
    s = sampler(sampler="curriculum", curriculum_iterations=9, prompts_per_iteration=30)
    assert [s.open_difficulties(i) for i in (0, 2, 3, 5, 6, 8, 50)] == \
        [[1], [1], [1, 2], [1, 2], [1, 2, 3], [1, 2, 3], [1, 2, 3]]
    rng = random.Random(0)
    assert {t.difficulty for t in s.sample(rng, 0)} == {1}
    assert {t.difficulty for t in s.sample(rng, 4)} == {1, 2}


def test_warmup_then_hard_samples_everything_then_only_the_hardest():
    s = sampler(sampler="curriculum", curriculum="warmup_then_hard", curriculum_iterations=5,
                prompts_per_iteration=60)
    rng = random.Random(0)
    assert {t.difficulty for t in s.sample(rng, 4)} == {1, 2, 3}
    assert {t.difficulty for t in s.sample(rng, 5)} == {3}


def test_prioritized_frequencies_follow_one_minus_success_with_a_floor():
    s = sampler(sampler="prioritized", prompts_per_iteration=1, priority_floor=0.1)
    solved, half, fresh = POOLS[0][0], POOLS[0][1], POOLS[0][2]
    s.update([solved, half], [True] * 8 + [True] * 4 + [False] * 4, n=8)
    assert (s.weight(solved), s.weight(half), s.weight(fresh)) == (0.1, 0.5, 1.0)
    # one draw per iteration: the probability of a problem is its share of the weights
    s.pools = [[solved, half, fresh]]
    rng, draws = random.Random(1), 20000
    counts = Counter(s.sample(rng, 0)[0].id for _ in range(draws))
    total = 0.1 + 0.5 + 1.0
    for task, w in ((solved, 0.1), (half, 0.5), (fresh, 1.0)):
        p = w / total
        sd = (p * (1 - p) / draws) ** 0.5
        assert abs(counts[task.id] / draws - p) < 4 * sd, (task.id, counts[task.id])


def test_prioritized_draws_without_replacement_and_respects_level_counts():
    s = sampler(sampler="prioritized", prompts_per_iteration=12, task_weights=[1, 1, 2])
    drawn = s.sample(random.Random(0), 0)
    assert len({t.id for t in drawn}) == 12
    assert Counter(t.difficulty for t in drawn) == {1: 3, 2: 3, 3: 6}


def test_sampler_state_round_trips():
    s = sampler(sampler="prioritized")
    s.update([POOLS[1][3]], [True, False, False, False], n=4)
    restored = sampler(sampler="prioritized")
    restored.load_state_dict(s.state_dict())
    assert restored.weight(POOLS[1][3]) == s.weight(POOLS[1][3]) == 0.75


def test_a_curriculum_with_task_weights_is_refused():
    with pytest.raises(ValueError, match="use one"):
        RLConfig(tasks=["add:1", "add:2"], sampler="curriculum", task_weights=[1, 1])


def test_sampler_state_is_saved_with_the_run_state(tmp_path):
    from k1rl.master.state import RunState

    s = sampler(sampler="prioritized")
    s.update([POOLS[2][0]], [True, True, False, False], n=4)
    RunState(run_id="x", sampler_state=s.state_dict()).save(tmp_path)
    resumed = sampler(sampler="prioritized")
    resumed.load_state_dict(RunState.load(tmp_path).sampler_state)
    assert resumed.weight(POOLS[2][0]) == 0.5
