"""Held-out evaluation (k1rl/master/evaluation.py): the metrics from fake services, the
config a checkpoint is evaluated with, and `k1rl eval` on a tiny model end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from k1rl.config import RunConfig
from k1rl.master.evaluation import (
    EVAL_SEED_OFFSET,
    accuracy,
    by_level,
    evaluation_config,
    needs_local_sandbox,
)
from k1rl.master.problems import load_problems
from k1rl.protocol import Completion, GenerateResult, PromptResult, RewardResult, RunRef


class FakeRollout:
    """Sample j of a prompt answers "right" when j is even (greedy: always right) on
    add tasks, "wrong" on sub tasks; records the requests."""

    def __init__(self):
        self.requests = []

    def call(self, method, req, reply_type):
        assert method == "generate"
        self.requests.append(req)
        n = req.sampling.n
        results = [PromptResult(prompt=p, prompt_token_ids=[1], completions=[
            Completion(token_ids=[1, 2], logprobs=[0.0, 0.0], finish_reason="stop",
                       policy_version=0,
                       text="right" if p.startswith("add") and j % 2 == 0 else "wrong")
            for j in range(n)]) for p in req.prompts]
        return GenerateResult(results=results, policy_version=0)


class FakeReward:
    def __init__(self):
        self.requests = []

    def call(self, method, req, reply_type):
        assert method == "score"
        self.requests.append(req)
        correct = [item.response == "right" for item in req.items]
        return RewardResult(rewards=[float(c) for c in correct], correct=correct)


def _tasks():
    from k1rl.data.problem import Problem

    return [Problem(id=f"{family}:2:{i}", prompt=f"{family} {i}", answer="0",
                    level=f"{family}:2")
            for family in ("add", "sub") for i in range(3)]


def test_accuracy_samples_with_the_run_seed_and_reports_each_level():
    cfg = RunConfig(seed=5)
    cfg.rollout.temperature = 0.8
    cfg.rollout.max_tokens = 17
    rollout, reward = FakeRollout(), FakeReward()
    tasks = _tasks()
    out = accuracy(cfg, rollout, reward, tasks, RunRef(iteration=3), samples=4)
    sampled, greedy = (r.sampling for r in rollout.requests)
    assert (sampled.n, sampled.temperature, sampled.max_tokens) == (4, 0.8, 17)
    assert (greedy.n, greedy.temperature) == (1, 0.0)
    assert sampled.seed == greedy.seed == 5 + EVAL_SEED_OFFSET
    # 4 samples per task, reward groups of 4 in task order
    assert [item.group_id for item in reward.requests[0].items] == [j // 4 for j in range(24)]
    assert out.accuracy == pytest.approx(0.25)  # half of add's samples, none of sub's
    assert out.accuracy_by_level == pytest.approx({"add:2": 0.5, "sub:2": 0.0})
    assert out.greedy == pytest.approx(0.5)
    assert out.greedy_by_level == {"add:2": 1.0, "sub:2": 0.0}
    assert out.seconds > 0
    # stored flat under a prefix: the names metrics.jsonl and every sink show
    assert set(out.row("eval")) == {"eval_accuracy", "eval_accuracy@add:2",
                                    "eval_accuracy@sub:2", "eval_greedy", "eval_greedy@add:2",
                                    "eval_greedy@sub:2", "eval_s"}


def test_one_level_has_no_per_level_accuracy():
    tasks = _tasks()[:3]
    assert by_level(tasks, [True] * 6, 2) == {}


def test_a_checkpoint_is_evaluated_on_fresh_ports_and_its_sandbox_only_for_code(tmp_path):
    cfg = RunConfig(seed=1)
    cfg.rl.tasks = ["add:2", "code:1"]
    cfg.rl.eval_tasks = ["add:2"]
    problems = load_problems(cfg)
    assert not needs_local_sandbox(cfg, problems, heldout_only=True)
    assert needs_local_sandbox(cfg, problems, heldout_only=False)  # training needs it
    out = evaluation_config(cfg, tmp_path, sandbox=False)
    assert out.model.path == str(tmp_path.resolve())
    assert out.rollout.address != cfg.rollout.address
    assert out.reward.address != cfg.reward.address
    # the same problems, whatever the ports
    assert load_problems(out).heldout_problems() == problems.heldout_problems()

    cfg.rl.eval_tasks = None  # every RL level is evaluated, code:1 included
    assert needs_local_sandbox(cfg, load_problems(cfg), heldout_only=True)
    out = evaluation_config(cfg, tmp_path, sandbox=True)
    assert out.reward.sandbox_address == out.sandbox.address != cfg.sandbox.address
    assert out.sandbox.http_port is None


def test_the_loop_evaluates_through_the_same_code():
    from k1rl.master import evaluation, loop

    assert loop.accuracy is evaluation.accuracy
    assert loop.load_problems is evaluation.load_problems


@pytest.mark.slow
def test_k1rl_eval_scores_a_checkpoint(tmp_path, trainer_model_dir):
    cfg = RunConfig(run_id="eval", seed=0)
    cfg.rollout.max_tokens = 8
    cfg.rl.tasks = ["add:1", "sub:1"]
    cfg.rl.eval_problems = 5
    cfg.rl.eval_samples = 2
    config = tmp_path / "run.yaml"
    config.write_text(cfg.dump_yaml())
    out = subprocess.run(
        [sys.executable, "-m", "k1rl", "eval", "--model", str(trainer_model_dir),
         "--config", str(config), "--eval-problems", "3", "--work-dir", str(tmp_path / "w")],
        check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"eval_accuracy", "eval_greedy", "eval_accuracy@add:1", "eval_greedy@sub:1",
            "eval_s"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if k.startswith("eval_") and
               not k.endswith("_s"))
