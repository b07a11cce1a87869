"""The master loop end to end with real services, and resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from k1rl.config import RunConfig
from k1rl.launch import free_tcp_address
from k1rl.master.state import RunState
from k1rl.schedule import BudgetSchedule, Phase


def _config(tmp_path, model_dir, iterations: int) -> RunConfig:
    cfg = RunConfig(run_id="e2e", seed=0)
    cfg.model.path = str(model_dir)
    for section in (cfg.trainer, cfg.rollout, cfg.reward, cfg.checkpoint_engine):
        section.address = free_tcp_address()
    cfg.rollout.n = 4
    cfg.rollout.max_tokens = 16
    cfg.rl.iterations = iterations
    cfg.rl.prompts_per_iteration = 4
    cfg.rl.pool_size = 50
    return cfg


def _k1rl(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "k1rl", *args], start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _metrics(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_new_run_refuses_a_directory_that_holds_one(tmp_path):
    from k1rl import master

    RunState(run_id="x").save(tmp_path)
    with pytest.raises(FileExistsError, match="already holds a run"):
        master.run(RunConfig(), tmp_path)


def test_run_state_round_trips_the_sampler_rng(tmp_path):
    import random

    rng = random.Random(3)
    rng.random()
    state = RunState(run_id="x", iterations_done=2, policy_version=5)
    state.remember_rng(rng)
    state.save(tmp_path)
    again = RunState.load(tmp_path).rng(seed=3)
    assert [again.random() for _ in range(3)] == [rng.random() for _ in range(3)]


@pytest.mark.slow
def test_killed_master_resumes_without_losing_an_iteration(tmp_path, trainer_model_dir):
    run_dir = tmp_path / "run"
    cfg = _config(tmp_path, trainer_model_dir, iterations=2)
    # a budget and a length-penalty weight per iteration (rl.schedule), kept after resume
    cfg.rl.schedule = BudgetSchedule(phases=[
        Phase(start=0, max_tokens=6, length_penalty_weight=0.5),
        Phase(start=1, length_penalty_weight=0.0)])
    config = tmp_path / "run.yaml"
    config.write_text(cfg.dump_yaml())

    first = _k1rl("rl", "--config", str(config), "--run-dir", str(run_dir))
    deadline = time.monotonic() + 600
    while not (run_dir / "state.json").exists():
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline, "first iteration never completed"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the master dies between iterations
    first.wait(30)
    assert RunState.load(run_dir).iterations_done == 1
    time.sleep(3)  # its services get SIGTERM from the kernel when it dies; let them exit

    second = _k1rl("run", "--resume", str(run_dir))  # `run`: the older name of `rl`
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0, out
    assert (run_dir / "final" / "config.json").is_file()  # the policy, exported as HF

    rows = _metrics(run_dir)
    assert [r["iteration"] for r in rows] == [0, 1]
    state = RunState.load(run_dir)
    assert state.iterations_done == 2
    # every trajectory is tagged with the policy that produced it, and policies only advance
    assert rows[0]["policy_version_rollout"] == 0
    assert rows[1]["policy_version_rollout"] == rows[0]["policy_version"]
    assert state.policy_version == rows[1]["policy_version"] > rows[0]["policy_version"]
    assert all(r["train_stale_samples"] == 0 for r in rows)
    assert all(r["switch_to_rollout_s"] > 0 for r in rows)
    assert [r["max_tokens"] for r in rows] == [6, 16]
    assert [r["length_penalty_weight"] for r in rows] == [0.5, 0.0]
    assert rows[0]["response_tokens_mean"] <= 6


@pytest.mark.slow
def test_partial_rollouts_park_continue_and_survive_a_resume(tmp_path, trainer_model_dir):
    """8-token segments up to 24 tokens: trajectories of the (untrained) model rarely end
    early, so most groups take three iterations; a resume goes on with the parked ones."""
    run_dir = tmp_path / "run"
    cfg = _config(tmp_path, trainer_model_dir, iterations=2)
    cfg.rollout.max_tokens = 8
    cfg.rollout.max_response_tokens = 24
    cfg.trainer.segments = "recent"
    config = tmp_path / "run.yaml"
    config.write_text(cfg.dump_yaml())
    first = _k1rl("run", "--config", str(config), "--run-dir", str(run_dir))
    out, _ = first.communicate(timeout=900)
    assert first.returncode == 0, out
    state = RunState.load(run_dir)
    parked_files = list((run_dir / "replay").glob("iter_*.json"))
    assert [str(p.resolve()) for p in parked_files] == [state.replay_file]

    # two more iterations, resumed from the saved buffer
    saved = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(saved.replace("iterations: 2", "iterations: 4"))
    second = _k1rl("run", "--resume", str(run_dir))
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0, out

    rows = [r for r in _metrics(run_dir) if "prompts_started" in r]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["replay_parked"] > 0 and rows[0]["trajectories_continued"] == 0
    for before, after in zip(rows, rows[1:]):  # every parked trajectory goes on next time
        assert after["trajectories_continued"] == before["replay_parked"]
        assert after["tokens_reused"] >= 8 * after["trajectories_continued"]
    # a group started in iteration 0 is done by iteration 2 (3 segments of 8 = 24 tokens)
    assert sum(r["groups_trained"] for r in rows[:3]) >= 4
    assert max(r["replay_age_max"] for r in rows) <= 2
    trained = [r for r in rows if r["groups_trained"]]
    assert trained and all(r["response_tokens_mean"] <= 24 for r in trained)
    assert all(r["train_rollout_logprob_diff"] < 1e-3 for r in trained if "train_loss" in r)
    # the detector is off: nothing is stopped for looping, and every decoded token is kept
    # (a continued segment never exceeds its 8-token budget)
    assert all(r["repetition_stops"] == 0 for r in rows)
    assert all(0 < r["decoded_tokens"] <= 8 * (r["trajectories_continued"] + 4 * 4)
               for r in rows)


@pytest.mark.slow
def test_first_iteration_stops_before_training_when_trainer_and_engine_disagree(
        tmp_path, trainer_model_dir):
    # the thresholds below any real float32 agreement (~1e-7): the run must stop at the
    # check, having trained nothing
    cfg = _config(tmp_path, trainer_model_dir, iterations=2)
    cfg.parity.mean_abs_diff = cfg.parity.max_abs_diff = 1e-12
    config = tmp_path / "run.yaml"
    config.write_text(cfg.dump_yaml())
    proc = _k1rl("rl", "--config", str(config), "--run-dir", str(tmp_path / "run"))
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 2, out
    assert "the trainer and the rollout engine disagree" in out
    assert "k1rl doctor --model" in out
    run = tmp_path / "run"
    assert _metrics(run) == [] and not (run / "state.json").exists()  # no iteration ended
    assert not list(run.glob("checkpoints/*"))
