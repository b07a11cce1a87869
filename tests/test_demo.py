"""`make demo`: its shipped config, its SFT schedule, and a miniature run end to end."""

from __future__ import annotations

import json

import pytest
import yaml

from k1rl.config import ConfigError
from k1rl.demo import DEFAULT_CONFIG, SFTSettings, SFTStop, load_demo_config, validation_set


def test_the_shipped_demo_config_measures_what_the_report_promises():
    cfg = load_demo_config(DEFAULT_CONFIG)
    rl = cfg.run.rl
    # held-out accuracy = pass@1 over >= 200 problems x >= 4 samples at the rollout temperature
    assert rl.eval_problems * len(rl.headline_tasks) >= 200
    assert rl.eval_samples >= 4
    assert rl.eval_every > 0
    assert cfg.run.rollout.temperature > 0
    assert cfg.run.rollout.max_tokens < cfg.run.rollout.max_model_len


def test_demo_config_errors_name_the_field(tmp_path):
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data["sft"]["lr"] = -1
    data["run"]["rl"]["tasks"] = ["add"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_demo_config(path)
    assert "sft.lr" in str(err.value)
    assert "run.rl.tasks" in str(err.value)


def test_sft_schedule_warms_up_linearly_then_decays_to_the_floor():
    s = SFTSettings(levels=["add:1"], steps=110, lr=1e-3, warmup_steps=10, min_lr_fraction=0.1)
    assert s.lr_at(0) == pytest.approx(1e-4)
    assert s.lr_at(9) == pytest.approx(1e-3)
    assert s.lr_at(10) == pytest.approx(1e-3)
    assert s.lr_at(60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half-way down the cosine
    assert s.lr_at(110) == pytest.approx(1e-4)
    lrs = [s.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_sft_validates_every_n_steps_from_min_steps_on():
    stop = SFTStop(accuracy=0.2, every=20, min_steps=200)
    assert [n for n in range(1, 301) if stop.due(n)] == [200, 220, 240, 260, 280, 300]


def test_sft_validation_problems_are_rl_levels_outside_the_prompt_pool_and_heldout_set():
    from k1rl.data.tasks import is_heldout
    from k1rl.master.problems import load_problems

    run = load_demo_config(DEFAULT_CONFIG).run
    problems = load_problems(run)
    val = validation_set(run, 100, problems)
    assert len(val) == 100 and len({t.id for t in val}) == 100
    assert {t.level for t in val} == set(run.rl.headline_tasks)
    assert not {t.id for t in val} & {t.id for pool in problems.train for t in pool}
    assert not {t.id for t in val} & {t.id for t in problems.heldout_problems()}
    assert not any(is_heldout(t.id) for t in val)


@pytest.mark.slow
def test_a_miniature_demo_writes_the_full_report(tmp_path):
    """Same code path as `make demo`, with 5 SFT steps and 2 RL iterations."""
    from k1rl.demo import run_demo

    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data["sft"].update(steps=5, problems_per_level=50)
    # validated after steps 2 and 4; an accuracy of 1 is out of a 5-step model's reach
    data["sft"]["stop_when"] = dict(accuracy=1.0, every=2, min_steps=2, problems=4, samples=2)
    data["run"]["rollout"]["max_tokens"] = 24
    data["run"]["rl"].update(iterations=2, eval_every=1, eval_problems=5, eval_samples=2,
                             prompts_per_iteration=4, pool_size=50)
    if "code:1" in data["run"]["rl"]["tasks"]:  # a code prompt every iteration
        data["run"]["rl"]["task_weights"] = [1] * (len(data["run"]["rl"]["tasks"]) - 1) + [2]
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
    # the code level's rewards came from the sandbox service the demo started
    if "code:1" in data["run"]["rl"]["tasks"]:
        assert all("accuracy@code:1" in r for r in rows if "reward_mean" in r)
        assert "sandbox ready" in (run_dir / "logs" / "sandbox.log").read_text()
        assert summary["reward_errors"] == 0
        assert set(summary["train_accuracy_by_level"]) == set(data["run"]["rl"]["tasks"])
    for png in ("reward.png", "heldout_accuracy.png", "response_length.png", "switch_times.png"):
        assert (run_dir / png).stat().st_size > 0
    assert (run_dir / "final" / "config.json").is_file()
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert (run_dir / "sft-hf" / "model.safetensors").is_file()  # the SFT, for other RL runs
    assert len((run_dir / "sft_metrics.jsonl").read_text().splitlines()) == 5
    assert summary["sft_steps"] == 5
    assert [v["after_steps"] for v in summary["sft_validation"]] == [2, 4]
    assert all(0 <= v["accuracy"] < 1 for v in summary["sft_validation"])
    with pytest.raises(FileExistsError, match="resume"):
        run_demo(load_demo_config(path), seed=3, run_dir=run_dir)
