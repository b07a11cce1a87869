"""The recovery table, end to end: bench/chaos.py's short run kills each service (SIGKILL
to its process group) at a chosen moment of a real run, and nothing is lost.

Iteration 1 takes kills in turn: the sidecar mid-switch, the trainer while an engine pulls
its weights, the engine mid-generate, the reward service mid-score, the trainer mid-train;
iteration 2 the trainer mid-checkpoint (in iteration 1 that moment would be the checkpoint
load of the mid-train recovery). The launcher restarts each (the sidecar restarts its
engine); the master re-sends, retries the step or redoes the iteration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "chaos.py"
MOMENTS = {"mid-switch": 1, "mid-publish": 1, "mid-generate": 1, "mid-score": 1,
           "mid-train": 1, "mid-checkpoint": 2}


@pytest.mark.slow
def test_each_service_killed_mid_request_loses_no_prompt_and_no_trajectory(tmp_path):
    at = ",".join(f"{m}@{i}" for m, i in MOMENTS.items())
    out = subprocess.run([sys.executable, str(BENCH), "--iterations", "3", "--at", at,
                          "--no-baseline", "--work-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=1500, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])

    assert [(k["moment"], k["at_iteration"]) for k in result["plan"]] == list(MOMENTS.items())
    assert result["kills"] == result["recovered"] == len(MOMENTS)
    assert result["lost_prompts"] == 0 and result["lost_trajectories"] == 0
    checks = result["checks"]
    assert checks["contiguous"] and checks["versions_monotonic"] and checks["ledger_resolved"]
    assert checks["by_status"] == {"trained": 3 * 4} and checks["trainer_gap"] == 0
    # each service came back: the launcher restarted trainer (3 kills), sidecar and reward
    assert result["restarts"] == {"trainer": 3, "rollout": 0, "reward": 1,
                                  "checkpoint_engine": 1}
    # the score was re-sent as it was; generate, train and checkpoint were retried alone
    assert result["resent"] >= 1 and result["retried"] >= 3
