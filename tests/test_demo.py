"""`make demo`: its shipped config, its SFT schedule, and a miniature run end to end."""

from __future__ import annotations

import json

import pytest
import yaml

from k1rl.config import ConfigError
from k1rl.demo import DEFAULT_CONFIG, load_demo_config


def test_the_shipped_demo_config_measures_what_the_report_promises():
    cfg = load_demo_config(DEFAULT_CONFIG)
    run = cfg.run
    heldout = {p.file: p for p in cfg.problems if p.split == "heldout"}
    # held-out accuracy = pass@1 over >= 200 problems x >= 4 samples at the rollout temperature
    assert sorted(heldout) == sorted(s.path for s in run.data.eval)
    assert sum(min(p.count * len(p.levels), run.rl.eval_problems)
               for p in heldout.values()) >= 200
    assert run.rl.eval_samples >= 4
    assert run.rl.eval_every > 0
    assert run.rollout.temperature > 0
    assert run.rollout.max_tokens < run.rollout.max_model_len
    # k1.5's length reward is on, and GRPO's advantages are not divided by each group's
    # std, which made that small reward a full-size signal in all-wrong groups (collapse)
    assert run.reward.length_penalty_weight > 0
    assert run.trainer.loss.name == "grpo" and run.trainer.loss.scale_rewards == "batch"
    # every file the run reads is one the demo writes
    written = [p.file for p in cfg.problems]
    read = [s.path for s in (*run.data.train, *run.data.eval, *run.sft.data.train,
                             *run.sft.stop_when.data)]
    assert all(any(f == path or f.startswith(path + "/") for f in written) for path in read)


def test_demo_config_errors_name_the_field(tmp_path):
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data["run"]["sft"]["stages"][0]["lr"] = -1
    data["problems"][0]["levels"] = ["add"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_demo_config(path)
    assert "run.sft.stages.0.lr" in str(err.value)
    assert "problems.0.levels" in str(err.value)


def test_the_sft_stops_validation_problems_are_outside_the_rl_pools_and_heldout_set(tmp_path):
    from k1rl.data.tasks import is_heldout, problem_ids
    from k1rl.demo import run_config, write_problems
    from k1rl.master.problems import load_problems

    cfg = load_demo_config(DEFAULT_CONFIG)
    write_problems(cfg, tmp_path, seed=0)
    run = run_config(cfg, 0, tmp_path, tmp_path / "model")
    problems = load_problems(run, tmp_path / "cache")
    val = problem_ids(run.sft.stop_when.data[0].path)
    assert len(val) == 100
    assert not val & {t.id for pool in problems.train for t in pool}
    assert not val & {t.id for t in problems.heldout_problems()}
    assert not any(is_heldout(i) for i in val)
    assert [len(pool) for pool in problems.heldout] == [100, 100]


@pytest.mark.slow
def test_a_miniature_demo_writes_the_full_report(tmp_path):
    """Same code path as `make demo`, with 5 SFT steps and 2 RL iterations."""
    from k1rl.demo import run_demo

    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    counts = {"problems/validation.jsonl": 2, "problems/heldout/add2.jsonl": 5,
              "problems/heldout/sub2.jsonl": 5}
    for item in data["problems"]:
        item["count"] = counts.get(item["file"], 50)
    run = data["run"]
    run["sft"]["stages"] = [{"steps": 5, "lr": 5.0e-3, "warmup_steps": 1}]
    # measured after steps 2 and 4; an accuracy of 1 is out of a 5-step model's reach
    run["sft"]["stop_when"].update(accuracy=1.0, every=2, min_steps=2, samples=2)
    run["rollout"]["max_tokens"] = 24
    run["rl"].update(iterations=2, eval_every=1, eval_problems=5, eval_samples=2,
                     prompts_per_iteration=4, task_weights=[1, 1, 2])  # code every iteration
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "run"

    summary = run_demo(load_demo_config(path), seed=3, run_dir=run_dir)

    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == summary
    for key in ("eval_accuracy_after_sft", "eval_accuracy_after_rl", "eval_greedy_after_sft",
                "eval_greedy_after_rl", "iterations", "wall_seconds",
                "mean_switch_to_rollout_s", "mean_switch_to_train_s"):
        assert key in summary, key
    assert summary["iterations"] == 2
    assert summary["mean_switch_to_rollout_s"] > 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # evaluated during iterations 0 and 1 (policies v_0, v_1) and after the last one (v_2)
    assert [r["iteration"] for r in rows if "eval_accuracy" in r] == [0, 1, 2]
    assert rows[-1]["policy_version"] == summary["policy_version"] == rows[1]["policy_version"]
    assert all(0 <= r["eval_accuracy"] <= 1 for r in rows if "eval_accuracy" in r)
    assert summary["heldout_levels"] == ["add:2", "sub:2"] and summary["heldout_problems"] == 10
    # the code level's rewards came from the sandbox service the run started
    assert all("accuracy@code:1" in r for r in rows if "reward_mean" in r)
    assert "sandbox ready" in (run_dir / "logs" / "sandbox.log").read_text()
    assert summary["reward_errors"] == 0
    assert set(summary["train_accuracy_by_level"]) == {"add:2", "sub:2", "code:1"}
    for png in ("reward.png", "heldout_accuracy.png", "response_length.png", "switch_times.png"):
        assert (run_dir / png).stat().st_size > 0
    # each step's own output where its command puts it
    assert (run_dir / "base-model" / "config.json").is_file()
    assert (run_dir / "sft" / "final" / "model.safetensors").is_file()  # for other RL runs
    assert (run_dir / "final" / "model.safetensors").is_file()
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["overall"]["problems"] == 10 and report["model"] == str(run_dir / "final")
    assert summary["final_eval"] == report["overall"]
    assert len((run_dir / "sft" / "sft_metrics.jsonl").read_text().splitlines()) == 5
    assert summary["sft_steps"] == 5
    assert [v["after_steps"] for v in summary["sft_validation"]] == [2, 4]
    assert all(0 <= v["accuracy"] < 1 for v in summary["sft_validation"])
    with pytest.raises(FileExistsError, match="resume"):
        run_demo(load_demo_config(path), seed=3, run_dir=run_dir)
