"""RL on a user's own data end to end with the real services: a chat-format math set with
\\boxed{} answers and a code set in the APPS input_output shape, through the chat
template, the math verifier and the sandbox."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from k1rl.config import RunConfig
from k1rl.launch import free_tcp_address
from k1rl.metrics.jsonl import read_metrics


def _write(path, rows):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.slow
def test_rl_on_chat_math_and_apps_code_files(tmp_path, chat_model_dir):
    from k1rl import master

    model = chat_model_dir
    math = _write(tmp_path / "gsm.jsonl", [
        *({"question": [{"role": "user", "content": f"What is {i} + {i}?"}],
           "reward_model": {"ground_truth": f"\\frac{{{4 * i}}}{{2}}"}} for i in range(40)),
        '{"question": "a row cut short\n'])
    code = _write(tmp_path / "apps.jsonl", [
        {"problem": f"Read n and print n + {i}.",
         "input_output": json.dumps({"inputs": ["1\n", "2\n"],
                                     "outputs": [f"{1 + i}\n", f"{2 + i}\n"]})}
        for i in range(40)])
    cfg = RunConfig.model_validate({
        "run_id": "data-rl", "model": {"path": str(model)},
        "rollout": {"n": 4, "max_tokens": 16},
        "rl": {"iterations": 2, "prompts_per_iteration": 4, "task_weights": [1, 1],
               "eval_every": 1, "eval_problems": 2, "eval_samples": 1},
        "data": {"train": [{"path": math, "fields": {"messages": "question",
                                                     "answer": "reward_model.ground_truth"}},
                           {"path": code, "fields": {"prompt": "problem",
                                                     "tests": "input_output"}}],
                 "on_bad_row": "skip", "heldout_fraction": 0.2,
                 "prompt": {"template": "chat", "system_prompt": "Answer in \\boxed{}."}},
    })
    for section in (cfg.trainer, cfg.rollout, cfg.reward, cfg.checkpoint_engine, cfg.sandbox):
        section.address = free_tcp_address()
    cfg.reward.sandbox_address = cfg.sandbox.address
    cfg.sandbox.http_port = None
    run_dir = tmp_path / "run"

    state = master.run(cfg, run_dir)

    assert state.iterations_done == 2
    records = read_metrics(run_dir)
    assert [r.iteration for r in records] == [0, 1, 2]  # 2 iterations + the final evaluation
    first = records[0]
    # the cut-short row is left out and counted; the rest are training or held-out problems
    assert first.data.skipped == {"json": 1}
    assert first.data.data_train_problems + first.data.data_heldout_problems <= 79
    assert first.data.data_heldout_problems == 4  # eval_problems per source
    for record in records[:2]:
        assert set(record.reward.accuracy_by_level) == {"gsm", "apps"}
        assert record.reward.reward_errors == 0  # the sandbox judged every program
        assert record.train.train_steps >= 1
    assert set(records[-1].eval.accuracy_by_level) == {"gsm", "apps"}
    assert "sandbox ready" in (run_dir / "logs" / "sandbox.log").read_text()

    # the run's policy, exported as HF, scored on the same held-out rows by `k1rl eval`
    report = tmp_path / "report.json"
    out = subprocess.run(
        [sys.executable, "-m", "k1rl", "eval", "--model", str(run_dir / "final"), "--config",
         str(run_dir / "config.yaml"), "--k", "1", "--out", str(report), "--work-dir",
         str(tmp_path / "eval")], capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(report.read_text())
    assert set(result["by_level"]) == {"gsm", "apps"}
    assert result["overall"]["problems"] == 4
    assert result["skipped"] == {"json": 1}
