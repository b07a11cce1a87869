"""rl.schedule: the token budget and length-penalty weight in force at each iteration
(warm-up, long2short's cut budget, Toggle's alternating phases)."""

import pytest

from k1rl.config import ConfigError, RunConfig
from k1rl.schedule import BudgetSchedule, Phase


def test_phases_hold_from_their_start_and_the_last_one_to_the_end():
    schedule = BudgetSchedule(phases=[Phase(start=2, length_penalty_weight=0.0),
                                      Phase(start=5, max_tokens=32, length_penalty_weight=0.3)])
    assert schedule.at(0) == Phase(start=0)  # before the first phase: the run's own settings
    assert schedule.at(2).length_penalty_weight == 0.0 and schedule.at(4).max_tokens is None
    assert schedule.at(5).max_tokens == 32 and schedule.at(500).length_penalty_weight == 0.3


def test_toggle_alternates_with_a_period():
    toggle = BudgetSchedule(period=10, phases=[Phase(start=0, max_tokens=16),
                                               Phase(start=5, max_tokens=64)])
    assert [toggle.at(i).max_tokens for i in (0, 4, 5, 9, 10, 14, 15, 23)] == [
        16, 16, 64, 64, 16, 16, 64, 16]


@pytest.mark.parametrize("text, message", [
    ("rl:\n  schedule: {phases: [{start: 5}, {start: 3}]}", "phase starts must increase"),
    ("rl:\n  schedule: {period: 4, phases: [{start: 0}, {start: 4}]}", "not within the period"),
    ("rl:\n  schedule: {phases: [{start: 0, max_tokens: 65}]}",
     "above rollout.max_tokens \\(64\\)"),
    ("rollout: {max_response_tokens: 128}\nrl:\n  schedule: {phases: [{start: 0, max_tokens: 8}]}",
     "needs partial rollouts off"),
    ("rl:\n  schedule: {phases: [{start: 0, length_penalty_weight: -1}]}",
     "rl.schedule.phases.0.length_penalty_weight"),
])
def test_bad_schedules_are_refused_at_load(text, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_yaml_text(text)


def test_a_schedule_round_trips_through_yaml():
    cfg = RunConfig.from_yaml_text(
        "rl:\n  schedule: {period: 6, phases: [{start: 0, max_tokens: 8}, "
        "{start: 3, length_penalty_weight: 0.2}]}")
    assert RunConfig.from_yaml_text(cfg.dump_yaml()) == cfg
