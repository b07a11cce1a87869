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
    Outcomes,
    accuracy,
    by_level,
    evaluation_config,
    needs_local_sandbox,
    pass_at_k,
    report,
    sample_outcomes,
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
            Completion(token_ids=[1] * (2 + j), logprobs=[0.0] * (2 + j), finish_reason="stop",
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


def test_outcomes_keep_each_samples_verdict_and_length_and_the_greedy_verdict():
    cfg = RunConfig(seed=5)
    out = sample_outcomes(cfg, FakeRollout(), FakeReward(), _tasks(), RunRef(), samples=3)
    assert out.correct[0] == [True, False, True]  # add: even samples are right
    assert out.correct[3] == [False, False, False]  # sub: never
    assert out.tokens[0] == [2, 3, 4]  # sample j has 2 + j tokens
    assert out.greedy == [True] * 3 + [False] * 3
    assert out.accuracy().accuracy == pytest.approx(1 / 3)


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (4, 1, 1, 0.25),          # pass@1 is the share of right samples
    (4, 1, 2, 0.5),           # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (4, 2, 2, 5 / 6),         # 1 - C(2,2)/C(4,2)
    (4, 0, 4, 0.0),
    (4, 1, 4, 1.0),           # any right sample among all n
    (5, 4, 2, 1.0),           # fewer wrong samples than k: certain
])
def test_pass_at_k_is_the_unbiased_estimate(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_needs_at_least_k_samples():
    with pytest.raises(ValueError, match="pass@5 needs"):
        pass_at_k(4, 1, 5)


def test_the_report_scores_overall_per_level_and_per_tag():
    from k1rl.data.problem import Problem

    problems = [Problem(id="a", prompt="a", answer="1", level="math", tags=["easy", "alg"]),
                Problem(id="b", prompt="b", answer="1", level="math", tags=["hard"]),
                Problem(id="c", prompt="c", answer="1", level="code", tags=["easy", "easy"])]
    outcomes = Outcomes(problems, correct=[[True, False], [False, False], [True, True]],
                        tokens=[[10, 20], [30, 30], [5, 7]], greedy=[True, False, False],
                        seconds=2.0)
    out = report(outcomes, k=2, model="m", data=["f.jsonl"], samples=2, temperature=1.0,
                 max_tokens=64, seed=0)
    assert out.overall.problems == 3
    assert out.overall.pass1 == pytest.approx(3 / 6)
    assert out.overall.pass_k == pytest.approx(2 / 3)  # a and c have a right sample
    assert out.overall.greedy == pytest.approx(1 / 3)
    assert out.overall.response_tokens == pytest.approx(102 / 6)
    assert set(out.by_level) == {"math", "code"}
    assert out.by_level["math"].pass1 == pytest.approx(0.25)
    assert out.by_level["code"].pass_k == 1.0
    # a problem counts once under each of its tags
    assert {t: s.problems for t, s in out.by_tag.items()} == {"alg": 1, "easy": 2, "hard": 1}
    assert out.by_tag["easy"].pass1 == pytest.approx(3 / 4)
    assert out.by_tag["hard"].response_tokens == 30


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


def test_k1rl_eval_refuses_a_k_above_the_samples_and_a_call_without_problems(tmp_path):
    from typer.testing import CliRunner

    from k1rl.cli import app

    (tmp_path / "config.json").write_text("{}")
    runner = CliRunner(env={"COLUMNS": "300"})  # the error panel on one line
    out = runner.invoke(app, ["eval", "--model", str(tmp_path)])
    assert out.exit_code != 0 and "--data" in out.output
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    out = runner.invoke(app, ["eval", "--model", str(tmp_path), "--data", str(rows),
                              "--samples", "2", "--k", "4"])
    assert out.exit_code != 0 and "at least 4" in out.output
    out = runner.invoke(app, ["eval", "--model", str(tmp_path),
                              "--data", str(tmp_path / "no.jsonl")])
    assert out.exit_code != 0 and "no such file" in out.output


@pytest.mark.slow
def test_k1rl_eval_reports_a_data_file_per_level_and_tag(tmp_path, trainer_model_dir):
    add, sub = tmp_path / "add.jsonl", tmp_path / "sub.jsonl"
    for path, family in ((add, "add"), (sub, "sub")):
        subprocess.run([sys.executable, "-m", "k1rl", "gen-tasks", str(path), "--family",
                        family, "--count", "6"], check=True, capture_output=True, timeout=120)
    cfg = RunConfig(run_id="eval", seed=0)
    cfg.rollout.max_tokens = 8
    config = tmp_path / "run.yaml"
    config.write_text(cfg.dump_yaml())
    report_path = tmp_path / "out" / "report.json"
    out = subprocess.run(
        [sys.executable, "-m", "k1rl", "eval", "--model", str(trainer_model_dir),
         "--data", str(add), "--data", str(sub), "--limit", "4", "--config", str(config),
         "--samples", "3", "--k", "2", "--out", str(report_path),
         "--work-dir", str(tmp_path / "w")],
        check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["report"] == str(report_path)
    assert {"eval_accuracy", "eval_greedy", "eval_accuracy@add", "eval_accuracy@sub"} <= set(summary)
    result = json.loads(report_path.read_text())
    assert (result["samples"], result["k"], result["max_tokens"]) == (3, 2, 8)
    assert result["overall"]["problems"] == 8  # --limit 4 of each file's 6 rows
    assert set(result["by_level"]) == {"add", "sub"}
    assert {"add", "add:1", "sub", "sub:1"} <= set(result["by_tag"])  # gen-tasks' tags
    assert result["overall"]["pass1"] <= result["overall"]["pass_k"] <= 1.0
    assert 0 < result["overall"]["response_tokens"] <= 8
    assert result["overall"]["pass1"] == pytest.approx(summary["eval_accuracy"])
    assert "pass@2" in out.stdout  # the table
