"""The recovery table, end to end: bench/chaos.py's short run kills each service (SIGKILL
to its process group) at a chosen moment of a real run, and nothing is lost.

Iteration 1 takes the kills in turn: the sidecar mid-switch, the trainer while an engine
pulls its weights, the engine mid-generate, the reward service mid-score, the trainer
mid-train. (A trainer's checkpoint save of this tiny model takes milliseconds, too short for
a kill from outside to land in reliably: mid-checkpoint is the benchmark's.) The launcher restarts each (the sidecar restarts its
engine); the master re-sends, retries the step or redoes the iteration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "chaos.py"
MOMENTS = ["mid-switch", "mid-publish", "mid-generate", "mid-score", "mid-train"]


@pytest.mark.slow
def test_each_service_killed_mid_request_loses_no_prompt_and_no_trajectory(tmp_path):
    at = ",".join(f"{m}@1" for m in MOMENTS)
    out = subprocess.run([sys.executable, str(BENCH), "--iterations", "2", "--at", at,
                          "--no-baseline", "--work-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=1500, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])

    assert [(k["moment"], k["at_iteration"]) for k in result["plan"]] == [
        (m, 1) for m in MOMENTS]
    assert result["kills"] == result["recovered"] == len(MOMENTS)
    assert result["lost_prompts"] == 0 and result["lost_trajectories"] == 0
    checks = result["checks"]
    assert checks["contiguous"] and checks["versions_monotonic"] and checks["ledger_resolved"]
    assert checks["by_status"] == {"trained": 2 * 4} and checks["trainer_gap"] == 0
    # each service came back: the launcher restarted trainer (2 kills), sidecar and reward
    assert result["restarts"] == {"trainer": 2, "rollout": 0, "reward": 1,
                                  "checkpoint_engine": 1}
    # the score was re-sent as it was; generate and train were retried alone; the switches
    # the sidecar and the trainer died in redid the iteration
    assert result["resent"] >= 1 and result["retried"] >= 2 and result["redone"] >= 2
