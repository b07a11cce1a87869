"""The sampler registry: samplers are chosen by name at config load, one module each, and
a sampler defined anywhere registers the same way. (What each sampler draws:
test_sampling.py.)"""

from __future__ import annotations

import random

import pytest

from k1rl.config import ConfigError, RunConfig
from k1rl.data.tasks import generate_tasks
from k1rl.master import samplers
from k1rl.master.samplers import PromptSampler, register
from k1rl.master.samplers.curriculum import Curriculum
from k1rl.master.samplers.prioritized import Prioritized
from k1rl.master.samplers.uniform import Uniform
from k1rl.rl_config import RLConfig

POOLS = [generate_tasks("add", 1, 20, seed=0), generate_tasks("add", 2, 20, seed=0)]
TASKS = ["add:1", "add:2"]


@register("first_problems")
class FirstProblems(PromptSampler):
    """Defined outside k1rl.master.samplers: the first prompts_per_iteration problems."""

    def sample(self, rng, iteration):
        return self.problems()[: self.cfg.prompts_per_iteration]


def test_each_built_in_sampler_is_created_by_its_name():
    assert {"uniform", "curriculum", "prioritized"} <= set(samplers.available())
    for name, cls in (("uniform", Uniform), ("curriculum", Curriculum),
                      ("prioritized", Prioritized)):
        sampler = samplers.create(RLConfig(tasks=TASKS, sampler=name), POOLS)
        assert type(sampler) is cls and sampler.name == name


def test_an_unknown_sampler_fails_at_config_load_listing_the_known_ones():
    with pytest.raises(ConfigError, match=r"rl.sampler: 'annealed' — unknown sampler "
                                          r"'annealed' \(registered: curriculum, .*prioritized, "
                                          r"uniform\)"):
        RunConfig.from_yaml_text("rl: {sampler: annealed}")


def test_a_sampler_defined_elsewhere_is_selectable_by_config():
    cfg = RunConfig.from_yaml_text(
        "rl: {sampler: first_problems, prompts_per_iteration: 3, tasks: [add:1, add:2]}")
    sampler = samplers.create(cfg.rl, POOLS)
    assert isinstance(sampler, FirstProblems)
    assert sampler.sample(random.Random(0), 0) == POOLS[0][:3]


def test_every_sampler_hears_outcomes_and_only_prioritized_keeps_them():
    for name in ("uniform", "curriculum", "first_problems"):
        sampler = samplers.create(RLConfig(tasks=TASKS, sampler=name), POOLS)
        sampler.update(POOLS[0][:1], [True, False], n=2)
        assert sampler.state_dict() == {}
    prioritized = samplers.create(RLConfig(tasks=TASKS, sampler="prioritized"), POOLS)
    prioritized.update(POOLS[0][:1], [True, False], n=2)
    assert prioritized.state_dict() == {"stats": {POOLS[0][0].id: [1, 2]}}


def test_run_states_written_before_the_registry_still_load():
    # every sampler used to save {"stats": ...}, empty unless it was prioritized
    for name in ("uniform", "curriculum"):
        samplers.create(RLConfig(tasks=TASKS, sampler=name), POOLS).load_state_dict({"stats": {}})
    prioritized = samplers.create(RLConfig(tasks=TASKS, sampler="prioritized"), POOLS)
    prioritized.load_state_dict({"stats": {POOLS[1][0].id: [3, 4]}})
    assert prioritized.weight(POOLS[1][0]) == 0.25
